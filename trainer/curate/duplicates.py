"""Clips that repeat other clips' footage: re-encoded, rescaled, at another frame rate, trimmed to
a sub-span, mirrored, letterboxed, or slowed down (a replay), and which part of it they repeat.

Each clip's fingerprint (fingerprint.py) is a sequence of frame hashes with times. Three steps,
each a handful of array operations over all clips at once (3,000 clips: bench/duplicates.py):

1. Candidates. Every hashed frame of every clip goes into one k-d tree (scipy), as it is and
   mirrored (a sign flip of the odd horizontal frequencies), projected onto the low spatial
   frequencies of its 2D DCT (an orthonormal projection, so it never makes two frames look further
   apart than they are). Every other frame of each clip asks for its 2 x `NEIGHBOURS` nearest
   frames within `FRAME_RADIUS`, approximately (`QUERY_EPS`), of which the `NEAREST_PER_CLIP`
   nearest of each other clip count. A pair of clips goes on when at least `SUPPORT` of the asking
   clip's frames found a frame of the other.
2. Mappings. Each matched frame votes for t_other = offset + speed * t_this at every speed in
   `SPEEDS`; each pair's `HYPOTHESES` best-supported mappings are aligned: the other clip's hashes
   are interpolated at the mapped times (resampling the sequence, so a replay at half speed or a
   copy at another frame rate lines up) and compared frame by frame. The best (if half its frames
   match, allowing for its offset being up to half a bin off) is also tried a quarter and half a
   sample either way.
3. Decision. A mapping holds when at least 1 - `TRIM` of this clip's frames inside the other match,
   it covers at least `CONTAINED` of this clip, and the two clips move together along it
   (`MIN_MOTION`): look-alike stills of the same stage, or a mapping at the wrong speed, fail that
   last test. A frame matches when its RMS distance to the interpolated frame, less what
   interpolation cannot know, is at most `FRAME_MATCH` (codec noise): where movement is fast
   against the sampling, each cell of the hash changes at some unknown moment between two samples,
   and the linear mix at weight w misses the true in-between frame by sqrt(w (1 - w)) times the
   step between the samples (RMS over the cells; less where the sequence barely bends, as smooth
   movement is nearly linear between samples). Fast movement between samples then costs no match,
   and the tolerance left for everything else can be tight: a look-alike of another bout differs
   a little on every frame, a copy does not.

Each group of clips sharing footage keeps one clip: the earliest of those that are not a part or a
slowed copy of another; the rest point at it (`Relation`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from trainer.curate.fingerprint import GRID, SAMPLE_RATE, Signature

# Seconds of the other clip per second of this one: 0.5 = this clip is a half-speed replay.
SPEEDS = (0.25, 1 / 3, 0.5, 2 / 3, 1.0, 1.5, 2.0, 3.0, 4.0)
FRAME_RADIUS = 0.02  # RMS (0-1 luma) within which a frame counts as a possible match
# RMS beyond the interpolation error at or under which an aligned frame matches: codec noise (the
# 99th percentile between true copies in bench/duplicates.py is 0.004-0.0085, letterboxed ones the highest).
FRAME_MATCH = 0.008
TRIM = 0.15  # at least 1 - TRIM of the aligned frames must match (a codec glitch, a flash, a cut frame may not)
MIN_MOTION = 0.75  # and the correlation of the clips' movement along the alignment at least this
MOTION_LAG = 2  # samples over which movement is measured (a quarter second: steadier than one frame)
CONTAINED = 0.8  # an alignment must cover this much of the clip it maps
MIN_FRAMES = 6  # and at least this many of its hashed frames
QUERY_STRIDE = 2  # every other hashed frame asks the tree
MIN_VOTES = 2  # matched frames of a clip that must agree on a mapping before it is aligned
HYPOTHESES = 2  # best-supported mappings aligned per pair of clips
CHUNK_ROWS = 32_768  # frame rows aligned per array operation (8 MB: they stay in cache, 2.5x faster than 100 MB)
KEY_SPAN = 1e6  # seconds: larger than any clip, so clip * KEY_SPAN + time sorts clip by clip
BIN_SPAN = 1 << 20  # offset bins per (pair, speed) in the packed hypothesis key
NEIGHBOURS = 16  # nearest frames each query frame gets from the tree, per orientation (2 * NEIGHBOURS in all)
NEAREST_PER_CLIP = 3  # of those, the nearest frames of each other clip that vote
QUERY_EPS = 1.0  # approximate search: each neighbour found is within (1 + QUERY_EPS) of the true k-th nearest
SUPPORT = 0.3  # share of a clip's query frames that must match frames of the other clip
DCT_ORDER = 4  # low frequencies kept for the tree: u + v < DCT_ORDER, DC excluded (9 dimensions)


@dataclass(frozen=True)
class Relation:
    """What `clip` repeats of `original`: t_original = offset + speed * t_clip over the spans."""

    clip: int
    original: int
    kind: str  # "same footage" (each covers the other) or "sub-span" (clip is a part of original)
    mirrored: bool
    speed: float  # seconds of original per second of clip: 0.5 = clip is slowed to half speed
    span_in_clip: tuple[float, float]
    span_in_original: tuple[float, float]
    distance: float  # mean RMS of the matching frames along the alignment, beyond interpolation error (0-1 luma)
    motion: float  # correlation of the two clips' changes along it (_motion_agreement)

    def reversed(self) -> Relation:
        return Relation(self.original, self.clip, self.kind, self.mirrored, 1 / self.speed,
                        self.span_in_original, self.span_in_clip, self.distance, self.motion)

    def describe(self) -> str:
        parts = [self.kind]
        if self.kind == "sub-span" or self.span_in_original[0] > 0.5 / SAMPLE_RATE:
            parts.append(f"{self.span_in_original[0]:.2f}-{self.span_in_original[1]:.2f} s of it")
        if self.mirrored:
            parts.append("mirrored")
        if self.speed < 0.95:
            parts.append(f"slowed {1 / self.speed:.2g}x")
        elif self.speed > 1.05:
            parts.append(f"sped up {self.speed:.2g}x")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {"kind": self.kind, "mirrored": self.mirrored, "speed": round(self.speed, 4),
                "span_in_clip_s": [round(t, 3) for t in self.span_in_clip],
                "span_in_original_s": [round(t, 3) for t in self.span_in_original],
                "distance": round(self.distance, 4), "motion": round(self.motion, 3), "summary": self.describe()}


def load_duplicate_search() -> None:
    """Import scipy's k-d tree (most of a second), so a caller can do it while it waits on other work."""
    importlib.import_module("scipy.spatial")


def _dct_projection() -> tuple[np.ndarray, np.ndarray]:
    """(GRID*GRID, K) orthonormal low-frequency DCT basis, and each column's sign under mirroring."""
    n = np.arange(GRID)
    basis_1d = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * GRID)) * np.sqrt(2 / GRID)
    basis_1d[0] /= np.sqrt(2)
    columns, signs = [], []
    for u in range(DCT_ORDER):
        for v in range(DCT_ORDER - u):
            if u or v:
                columns.append(np.outer(basis_1d[u], basis_1d[v]).ravel())
                signs.append(-1.0 if v % 2 else 1.0)  # x -> GRID-1-x flips odd horizontal frequencies
    return np.stack(columns, axis=1).astype(np.float32), np.asarray(signs, np.float32)


def _resample(other: Signature, times: np.ndarray) -> np.ndarray:
    """`other`'s hashes at `times` (inside its span), interpolated linearly between its samples."""
    position = np.interp(times, other.times, np.arange(len(other.times), dtype=np.float64))
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(other.times) - 1)
    weight = (position - low)[:, None].astype(np.float32)
    return other.hashes[low] * (1 - weight) + other.hashes[high] * weight


def _motion_agreement(clip: Signature, other: Signature, speed: float, offset: float, inside: np.ndarray) -> float:
    """Correlation between how the two clips change over `MOTION_LAG` samples along the mapping:
    near 1 when the same movement happens at the same moments, near 0 for footage that merely
    looks alike (the same still scene, or a mapping at the wrong speed). It is measured at the
    samples of whichever clip has fewer per second of footage, the other interpolated between its
    denser ones: interpolating the sparser clip would smooth its movement into a straight line
    between samples (a half-speed replay against its original decorrelated that way)."""
    if speed >= 1.0 or not inside.any():
        mine = clip.hashes[inside]
        theirs = _resample(other, offset + speed * clip.times[inside])
    else:  # `clip` is the slowed one: sample it at the other's times along the span
        start, end = offset + speed * clip.times[inside][[0, -1]]
        along = (other.times >= start) & (other.times <= end)
        mine = _resample(clip, (other.times[along] - offset) / speed)
        theirs = other.hashes[along]
    if len(mine) <= MOTION_LAG:
        return 0.0
    mine, theirs = mine[MOTION_LAG:] - mine[:-MOTION_LAG], theirs[MOTION_LAG:] - theirs[:-MOTION_LAG]
    energy = np.sqrt((mine**2).sum() * (theirs**2).sum())
    return float((mine * theirs).sum() / energy) if energy > 0 else 0.0


def _excess_rms(rms: np.ndarray, weight: np.ndarray, mix_error: np.ndarray) -> np.ndarray:
    """A frame's RMS distance to the other clip's hash interpolated at `weight` between two samples,
    less what that interpolation cannot know. If each cell changes at an unknown moment between the
    samples (movement fast against the sampling), it has changed with probability w, and the linear
    mix misses it by sqrt(w (1 - w)) times the step, in RMS over the cells; smooth movement is
    missed by less, which `mix_error` (_Frames) bounds by the bend of the sequence there."""
    return np.maximum(rms - np.sqrt(weight * (1 - weight)) * mix_error, 0.0)


def _contains(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """np.isin(values, ordered) for a sorted `ordered`, by binary search (isin sorts both)."""
    if len(ordered) == 0:
        return np.zeros(len(values), dtype=bool)
    return ordered[np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)] == values


def _sorted_unique(values: np.ndarray, return_counts: bool = False):
    """np.unique by sorting. numpy 2.x's default np.unique goes through a hash set, which on
    millions of distinct int64 keys is 40x slower than sorting them (numpy/numpy#31969): most of
    the compare time at 3,000 clips went there."""
    ordered = np.sort(values)
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    if not return_counts:
        return ordered[first]
    return ordered[first], np.diff(np.r_[np.flatnonzero(first), len(ordered)])


@dataclass(frozen=True)
class _Frames:
    """Every usable clip's hashes laid end to end, so alignments of many clip pairs are computed
    in a few array operations instead of one Python loop turn each."""

    clips: list[int]  # index in the caller's list, per local clip
    starts: np.ndarray  # first row of each local clip
    lengths: np.ndarray
    times: np.ndarray  # (rows,) float64
    hashes: np.ndarray  # (2 * rows, GRID*GRID): each frame's hash, then the same frames flipped left to right
    steps: np.ndarray  # (rows, GRID*GRID): each hash's change to the next one of its clip (zero after the last)
    step_rms: np.ndarray  # (rows,) RMS of each step
    mix_error: np.ndarray  # (rows,) scale of the interpolation error between each sample and the next (_excess_rms)
    points: np.ndarray  # (2 * rows, K): their low-frequency DCT projections (_dct_projection), likewise
    keys: np.ndarray  # local clip * KEY_SPAN + time: sorted, so one searchsorted finds a time in any clip

    @classmethod
    def of(cls, signatures: list[Signature | None]) -> _Frames:
        clips = [i for i, s in enumerate(signatures) if s is not None and len(s.times) >= MIN_FRAMES]
        lengths = np.array([len(signatures[i].times) for i in clips], dtype=np.int64)
        times = np.concatenate([signatures[i].times for i in clips]).astype(np.float64)
        rows = int(lengths.sum())
        both = np.empty((2 * rows, GRID * GRID), np.float32)  # as it is, then mirrored
        hashes = np.concatenate([signatures[i].hashes for i in clips], out=both[:rows])
        both[rows:] = hashes.reshape(-1, GRID, GRID)[:, :, ::-1].reshape(rows, -1)
        projection, mirror_signs = _dct_projection()
        points = hashes @ projection
        steps = np.empty_like(hashes)
        np.subtract(hashes[1:], hashes[:-1], out=steps[:-1])
        ends = np.cumsum(lengths) - 1
        steps[ends] = 0.0
        step_squares = np.einsum("ij,ij->i", steps, steps)
        step_rms = np.sqrt(step_squares / (GRID * GRID))
        # The scale of how far the mix of two neighbouring samples can miss a frame between them
        # (_excess_rms): the step where the sequence jumps, but no more than its bend (second
        # difference) on either side where it moves smoothly, nearly linearly between samples.
        bend = np.full(rows, np.inf)
        turn = np.einsum("ij,ij->i", steps[1:-1], steps[:-2])  # |s - s'|^2 = |s|^2 + |s'|^2 - 2 s.s', no temporary
        bend[1:-1] = np.sqrt(np.maximum(step_squares[1:-1] + step_squares[:-2] - 2 * turn, 0.0) / (GRID * GRID))
        bend[ends] = bend[ends - lengths + 1] = np.inf  # a clip's first and last sample: no bend to see
        mix_error = np.minimum(step_rms, np.maximum(bend, np.r_[bend[1:], np.inf]))
        owner = np.repeat(np.arange(len(clips)), lengths)
        return cls(clips, ends - lengths + 1, lengths, times, both, steps, step_rms, mix_error,
                   np.concatenate([points, points * mirror_signs]), owner * KEY_SPAN + times)

    @property
    def rows(self) -> int:
        return len(self.times)

    @property
    def durations(self) -> np.ndarray:
        return self.times[self.starts + self.lengths - 1] - self.times[self.starts]


def _verify(frames: _Frames, a: np.ndarray, b: np.ndarray, mirrored: np.ndarray, speed: np.ndarray,
            offset: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each mapping (local clip a onto local clip b: t_b = offset + speed * t_a, a mirrored or
    not): the share of a's frames inside b that match (`_excess_rms` <= FRAME_MATCH), their mean
    excess RMS, the first and last of a's times inside b, and the share that would match if the
    offset were off by up to half an offset bin (a frame may then be off by half a bin's worth of
    the other clip's movement). b's hashes are interpolated at the mapped times."""
    count = len(a)
    matched_share, distance = np.zeros(count), np.full(count, np.inf)
    share_within_a_bin = np.zeros(count)
    first, last = np.zeros(count), np.zeros(count)
    rows_per = frames.lengths[a]
    bounds = np.r_[0, np.cumsum(rows_per)]
    # Chunks of hypotheses holding at most about CHUNK_ROWS frame rows each.
    cuts = np.unique(np.searchsorted(bounds, np.arange(0, bounds[-1], CHUNK_ROWS), side="right") - 1)
    for lo_h, hi_h in zip(cuts, np.r_[cuts[1:], count]):
        h = np.arange(lo_h, hi_h)
        rep = np.repeat(h, rows_per[h])
        offsets_in_chunk = bounds[h] - bounds[lo_h]
        row = frames.starts[a[rep]] + np.arange(len(rep)) - np.repeat(offsets_in_chunk, rows_per[h])
        t = frames.times[row]
        mapped = offset[rep] + speed[rep] * t
        b_first = frames.starts[b[rep]]
        b_last = b_first + frames.lengths[b[rep]] - 1
        slack = 0.5 / SAMPLE_RATE * np.maximum(1.0, speed[rep])
        inside = (mapped >= frames.times[b_first] - slack) & (mapped <= frames.times[b_last] + slack)
        low = np.clip(np.searchsorted(frames.keys, b[rep] * KEY_SPAN + mapped, side="right") - 1, b_first, b_last - 1)
        weight = np.clip((mapped - frames.times[low]) / (frames.times[low + 1] - frames.times[low]), 0.0, 1.0)
        weight = weight[:, None].astype(np.float32)
        # mine - theirs, theirs = b's hash at `low` plus `weight` of the step to the next one (in
        # place: these are the largest arrays here).
        difference = frames.hashes[row + frames.rows * mirrored[rep]]
        difference -= frames.hashes[low]
        step = frames.steps[low]
        step *= weight
        difference -= step
        rms = _excess_rms(np.sqrt(np.einsum("ij,ij->i", difference, difference) / (GRID * GRID)),
                          weight[:, 0], frames.mix_error[low])
        good = inside & (rms <= FRAME_MATCH)
        half_a_bin = np.maximum(1.0, speed[rep]) / 2 * frames.step_rms[low]
        good_within_a_bin = inside & (rms <= FRAME_MATCH + half_a_bin)
        local = rep - lo_h
        inside_count = np.bincount(local, inside, minlength=len(h))
        good_count = np.bincount(local, good, minlength=len(h))
        enough = inside_count >= MIN_FRAMES
        matched_share[h] = np.where(enough, good_count / np.maximum(inside_count, 1), 0.0)
        good_within_a_bin_count = np.bincount(local, good_within_a_bin, minlength=len(h))
        share_within_a_bin[h] = np.where(enough, good_within_a_bin_count / np.maximum(inside_count, 1), 0.0)
        distance[h] = np.bincount(local, rms * good, minlength=len(h)) / np.maximum(good_count, 1)
        distance[h[good_count == 0]] = np.inf
        first[h] = np.minimum.reduceat(np.where(inside, t, np.inf), offsets_in_chunk)
        last[h] = np.maximum.reduceat(np.where(inside, t, -np.inf), offsets_in_chunk)
    return matched_share, distance, first, last, share_within_a_bin


def _candidate_votes(frames: _Frames) -> tuple[np.ndarray, ...]:
    """Matched frames from the k-d tree: (clip a, clip b, mirrored, t_a, frame index in a, t_b)
    for every query frame of a and near frame of b, for pairs where enough of a's frames match.

    The tree holds every frame as it is and mirrored, so one query per frame finds both kinds of
    copy (mirroring is an isometry: a mirrored frame near a query is the query mirrored near the
    frame). The search is approximate (`QUERY_EPS`): it only proposes candidates, each of which
    is aligned frame by frame afterwards, and exact nearest neighbours cost 2.5x as much."""
    from scipy.spatial import cKDTree

    owner = np.repeat(np.arange(len(frames.clips)), frames.lengths)
    within = np.arange(len(owner)) - frames.starts[owner]
    query_rows = np.flatnonzero(within % QUERY_STRIDE == 0)
    query_count = np.bincount(owner[query_rows], minlength=len(frames.clips))
    tree = cKDTree(frames.points)
    distances, found = tree.query(frames.points[query_rows], k=2 * NEIGHBOURS, eps=QUERY_EPS,
                                  distance_upper_bound=FRAME_RADIUS * GRID, workers=-1)
    # One row per query frame, its neighbours nearest first. Of those, only its NEAREST_PER_CLIP
    # nearest frames of any one other clip (and orientation) vote: where there are few clips, a
    # frame of a mostly still clip has most of the other clip's frames among its neighbours, and
    # their votes would flatten every offset.
    mirrored, found = found >= frames.rows, found % frames.rows
    other = owner[found] * 2 + mirrored
    usable = np.isfinite(distances) & (owner[found] != owner[query_rows][:, None])
    other = np.where(usable, other, -1)
    order = np.argsort(other, axis=1, kind="stable")  # same clip together, nearest first
    ordered = np.take_along_axis(other, order, axis=1)
    column = np.arange(other.shape[1])[None, :]
    run_start = np.maximum.accumulate(np.where(np.c_[np.ones((len(other), 1), bool), ordered[:, 1:] != ordered[:, :-1]],
                                               column, 0), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, column - run_start, axis=1)
    vote = usable & (rank < NEAREST_PER_CLIP)
    query = np.broadcast_to(query_rows[:, None], other.shape)[vote]
    found, mirrored = found[vote], mirrored[vote]
    a, b = owner[query], owner[found]
    pair = (a * len(frames.clips) + b) * 2 + mirrored
    # Pairs whose matched frames are too few to cover CONTAINED of a are not worth aligning.
    per_frame = int(frames.lengths.max()) + 1
    pairs, voters = _sorted_unique(_sorted_unique(pair * per_frame + within[query]) // per_frame, return_counts=True)
    needed = np.maximum(MIN_VOTES, SUPPORT * query_count[pairs // 2 // len(frames.clips)])
    wanted = _contains(pairs[voters >= needed], pair)
    return (a[wanted], b[wanted], mirrored[wanted], frames.times[query[wanted]], within[query[wanted]],
            frames.times[found[wanted]])


def _hypotheses(frames: _Frames, a, b, mirrored, t_a, frame_a, t_b) -> tuple[np.ndarray, ...]:
    """The HYPOTHESES best-supported mappings per (a, b, mirrored): each matched frame votes, once,
    for the offset bin t_b - speed * t_a of every speed at which a fits inside b; a bin's support
    includes its two neighbours'. Ties go to the slower speed, then the earlier offset."""
    durations = frames.durations
    bin_width = 1.0 / SAMPLE_RATE
    n = len(frames.clips)
    per_frame = int(frames.lengths.max()) + 1
    pair = (a * n + b) * 2 + mirrored
    keys = []
    for speed_index, speed in enumerate(SPEEDS):
        fits = CONTAINED * speed * durations[a] <= durations[b] + bin_width
        offset_bin = np.round((t_b[fits] - speed * t_a[fits]) / (bin_width * max(1.0, speed))).astype(np.int64)
        cell = (pair[fits] * len(SPEEDS) + speed_index) * BIN_SPAN + offset_bin + BIN_SPAN // 2
        keys.append(cell * per_frame + frame_a[fits])
    # One sort: distinct (cell, voting frame), cell by cell, so each cell's count is a run length.
    cell = _sorted_unique(np.concatenate(keys)) // per_frame
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    counts = np.diff(np.r_[starts, len(cell)])
    cell = cell[starts]
    support = counts.copy()
    follows = cell[1:] == cell[:-1] + 1  # the next cell is the neighbouring offset bin
    support[1:] += np.where(follows, counts[:-1], 0)
    support[:-1] += np.where(follows, counts[1:], 0)
    # The HYPOTHESES best-supported cells of each pair, by repeated segment maxima (cells are sorted
    # by pair, so each pair is one run; the first of equals wins).
    group = cell // BIN_SPAN // len(SPEEDS)
    new_group = np.r_[True, group[1:] != group[:-1]]
    group_starts, segment = np.flatnonzero(new_group), np.cumsum(new_group) - 1
    remaining = support.astype(np.int64)
    position = np.arange(len(cell))
    chosen = []
    for _ in range(HYPOTHESES):
        top = np.maximum.reduceat(remaining, group_starts)
        first = np.minimum.reduceat(np.where(remaining == top[segment], position, len(cell)), group_starts)
        first = first[top >= MIN_VOTES]
        chosen.append(first)
        remaining[first] = -1
    cell = cell[np.sort(np.concatenate(chosen))]
    speeds = np.asarray(SPEEDS)[cell // BIN_SPAN % len(SPEEDS)]
    offsets = (cell % BIN_SPAN - BIN_SPAN // 2) * bin_width * np.maximum(1.0, speeds)
    pair = cell // BIN_SPAN // len(SPEEDS)
    return pair // 2 // n, pair // 2 % n, (pair % 2).astype(bool), speeds, offsets


def _best_per_pair(pair_key: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Index of the highest `score` for each distinct `pair_key`."""
    order = np.lexsort((-score, pair_key))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_key[order][1:] != pair_key[order][:-1]
    return order[first]


def find_relations(signatures: list[Signature | None]) -> list[Relation]:
    """Every (clip, original) pair where `clip` repeats at least `CONTAINED` of itself from `original`."""
    if sum(1 for s in signatures if s is not None and len(s.times) >= MIN_FRAMES) < 2:
        return []
    frames = _Frames.of(signatures)
    votes = _candidate_votes(frames)
    if len(votes[0]) == 0:
        return []
    a, b, mirrored, speed, offset = _hypotheses(frames, *votes)
    if len(a) == 0:
        return []
    n = len(frames.clips)
    # Score every hypothesis and keep each pair's best; then try its offset a quarter and half a
    # sample either way too (an offset bin is a sample wide or more), and keep the best of the five.
    share, distance, first, last, share_within_a_bin = _verify(frames, a, b, mirrored, speed, offset)
    best = _best_per_pair((a * n + b) * 2 + mirrored, share - distance)
    best = best[share_within_a_bin[best] >= 0.5]  # a bin's centre may be half a bin off the mapping
    shifts = np.array([-2, -1, 1, 2]) * 0.25 / SAMPLE_RATE
    shifted = (offset[best][:, None] + np.maximum(1.0, speed[best])[:, None] * shifts[None, :]).ravel()
    repeated = [np.repeat(x[best], len(shifts)) for x in (a, b, mirrored, speed)]
    refined = _verify(frames, *repeated, shifted)
    a, b, mirrored, speed = (np.concatenate([x[best], y]) for x, y in zip((a, b, mirrored, speed), repeated))
    offset = np.concatenate([offset[best], shifted])
    share, distance, first, last = (np.concatenate([x[best], y]) for x, y in zip((share, distance, first, last), refined[:4]))
    accepted = (share >= 1 - TRIM) & (last - first >= CONTAINED * frames.durations[a])
    relations = []
    for index in _best_per_pair((a * n + b) * 2 + mirrored, accepted * 10.0 - distance):
        if not accepted[index]:
            continue
        clip_index, other_index = frames.clips[a[index]], frames.clips[b[index]]
        clip = signatures[clip_index].mirrored() if mirrored[index] else signatures[clip_index]
        other = signatures[other_index]
        span_in_clip = (float(first[index]), float(last[index]))
        inside = (clip.times >= span_in_clip[0]) & (clip.times <= span_in_clip[1])
        motion = _motion_agreement(clip, other, float(speed[index]), float(offset[index]), inside)
        if motion < MIN_MOTION:
            continue  # alike, but not the same movement: a still stretch of a similar scene, or a wrong speed
        span_in_original = (max(0.0, float(offset[index] + speed[index] * span_in_clip[0])),
                            min(float(other.times[-1]), float(offset[index] + speed[index] * span_in_clip[1])))
        covers_original = span_in_original[1] - span_in_original[0] >= CONTAINED * other.duration
        relations.append(Relation(clip_index, other_index, "same footage" if covers_original else "sub-span",
                                  bool(mirrored[index]), float(speed[index]), span_in_clip, span_in_original,
                                  float(distance[index]), motion))
    # One relation per pair of clips, the closest: a mirrored copy can also align, less well, unmirrored.
    closest: dict[frozenset, Relation] = {}
    for relation in relations:
        key = frozenset((relation.clip, relation.original))
        if key not in closest or relation.distance < closest[key].distance:
            closest[key] = relation
    return sorted(closest.values(), key=lambda r: (r.clip, r.original))


def find_duplicates(signatures: list[Signature | None]) -> dict[int, tuple[int, Relation]]:
    """{index: (the clip kept for its group, how it repeats footage)} for every clip that repeats
    another's; the relation is to the kept clip when they matched directly, else to the copy that
    links them."""
    return group_duplicates(find_relations(signatures), len(signatures))


def group_duplicates(relations: list[Relation], count: int) -> dict[int, tuple[int, Relation]]:
    """find_duplicates from relations already found between `count` clips."""
    if not relations:
        return {}
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    contained = set()
    for relation in relations:
        parent[root(relation.clip)] = root(relation.original)
        if relation.kind == "sub-span" or relation.speed < 0.95:
            contained.add(relation.clip)  # a part of the other, or a slowed copy of it
    groups: dict[int, list[int]] = {}
    for member in sorted({r.clip for r in relations} | {r.original for r in relations}):
        groups.setdefault(root(member), []).append(member)
    direct: dict[tuple[int, int], Relation] = {}
    for relation in relations:
        for oriented in (relation, relation.reversed()):
            key = (oriented.clip, oriented.original)
            if key not in direct or oriented.distance < direct[key].distance:
                direct[key] = oriented
    duplicates = {}
    for members in groups.values():
        keeper = min(members, key=lambda i: (i in contained, i))
        for member in members:
            if member != keeper:
                # Linked to the kept clip through another copy: the mapping reported is to that copy.
                relation = direct.get((member, keeper)) or min(
                    (r for (c, _), r in direct.items() if c == member), key=lambda r: r.distance)
                duplicates[member] = (keeper, relation)
    return duplicates
