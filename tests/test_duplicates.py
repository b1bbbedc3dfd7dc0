"""Duplicate search internals (trainer/curate/duplicates.py) against plain-Python references, and
relations on footage constructed in code (trims, slowed and mirrored copies, look-alikes)."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.curate import duplicates
from trainer.curate.duplicates import (
    CONTAINED, FRAME_MATCH, HYPOTHESES, MIN_FRAMES, MIN_VOTES, SPEEDS, _contains, _excess_rms, _Frames,
    _hypotheses, _sorted_unique, _verify, find_relations,
)
from trainer.curate.fingerprint import GRID, SAMPLE_RATE, Signature

CELLS = GRID * GRID


def footage(times: np.ndarray, seed: int) -> np.ndarray:
    """Hashes of made-up footage at footage `times`: a still backdrop with two blobs (athletes)
    wandering across the grid along smooth random paths, mean removed, like a bout's frames
    (consecutive samples about 0.01-0.03 RMS apart)."""
    rng = np.random.default_rng(seed)
    backdrop = rng.uniform(-0.2, 0.2, CELLS)
    y, x = np.divmod(np.arange(CELLS), GRID)
    values = np.tile(backdrop, (len(times), 1))
    for _ in range(2):
        frequency, phase = rng.uniform(0.1, 0.3, 2), rng.uniform(0, 2 * np.pi, 2)
        centre_x = 3.5 + 2.5 * np.sin(2 * np.pi * frequency[0] * times + phase[0])
        centre_y = 3.5 + 1.5 * np.sin(2 * np.pi * frequency[1] * times + phase[1])
        values += rng.uniform(0.15, 0.25) * np.exp(-((x - centre_x[:, None]) ** 2 + (y - centre_y[:, None]) ** 2) / 2.0)
    return (values - values.mean(axis=1, keepdims=True)).astype(np.float32)


def clip_of(seed: int, start: float, seconds: float, speed: float = 1.0) -> Signature:
    """A clip sampled at SAMPLE_RATE whose time t shows footage time start + speed * t."""
    times = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    return Signature(times.astype(np.float32), footage(start + speed * times, seed))


def test_sorted_unique_and_contains_equal_numpy():
    """Guards the sort-based replacements of np.unique and np.isin (numpy's hash-set unique is 40x
    slower on millions of keys): values and run counts must be numpy's, membership np.isin's."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5_000, 20_000) * (1 << 40) + rng.integers(0, 3, 20_000)
    expected_values, expected_counts = np.unique(values, return_counts=True)
    got_values, got_counts = _sorted_unique(values, return_counts=True)
    np.testing.assert_array_equal(got_values, expected_values)
    np.testing.assert_array_equal(got_counts, expected_counts)
    np.testing.assert_array_equal(_sorted_unique(values), expected_values)
    probe = rng.integers(0, 5_000, 3_000) * (1 << 40) + rng.integers(0, 4, 3_000)
    np.testing.assert_array_equal(_contains(expected_values[::3], probe), np.isin(probe, expected_values[::3]))
    assert not _contains(np.array([], dtype=np.int64), probe).any()


def _random_frames(rng: np.random.Generator, clips: int) -> _Frames:
    lengths = rng.integers(MIN_FRAMES, 40, clips)
    return _Frames.of([Signature((np.arange(n) / SAMPLE_RATE).astype(np.float32),
                                 rng.normal(0, 0.05, (n, CELLS)).astype(np.float32)) for n in lengths])


def test_vote_counting_equals_a_plain_count():
    """Guards the vectorised vote count (one sort of packed keys, neighbour bins by adjacency, the
    best cells by repeated segment maxima): on random votes, the mappings tried must be exactly those
    of a plain count: per (clip a, clip b, mirrored, speed, offset bin) the distinct frames of a
    voting for it, plus those of the two neighbouring bins, the HYPOTHESES best per pair (ties to
    the slower speed, then the earlier bin) with at least MIN_VOTES."""
    rng = np.random.default_rng(3)
    frames = _random_frames(rng, 7)
    count = 4_000
    a = rng.integers(0, 7, count)
    b = (a + rng.integers(1, 7, count)) % 7
    mirrored = rng.random(count) < 0.3
    frame_a = np.array([rng.integers(0, frames.lengths[i]) for i in a])
    t_a = frames.times[frames.starts[a] + frame_a]
    # Offsets cluster (so bins get real support and ties) around a few mappings per pair.
    t_b = np.round(t_a * rng.choice(SPEEDS, count) + rng.choice([0.0, 0.5, 1.25], count), 3) + rng.normal(0, 0.05, count)

    voters: dict[tuple, set] = {}
    durations = frames.durations
    for i in range(count):
        for k, speed in enumerate(SPEEDS):
            if CONTAINED * speed * durations[a[i]] > durations[b[i]] + 1 / SAMPLE_RATE:
                continue
            offset_bin = int(np.round((t_b[i] - speed * t_a[i]) / (max(1.0, speed) / SAMPLE_RATE)))
            voters.setdefault((int(a[i]), int(b[i]), bool(mirrored[i]), k, offset_bin), set()).add(int(frame_a[i]))
    by_pair: dict[tuple, list] = {}
    for (pa, pb, pm, k, offset_bin), frames_voting in voters.items():
        support = sum(len(voters.get((pa, pb, pm, k, offset_bin + d), ())) for d in (-1, 0, 1))
        by_pair.setdefault((pa, pb, pm), []).append((-support, k, offset_bin))
    expected = set()
    for (pa, pb, pm), cells in by_pair.items():
        for negative_support, k, offset_bin in sorted(cells)[:HYPOTHESES]:
            if -negative_support >= MIN_VOTES:
                speed = SPEEDS[k]
                expected.add((pa, pb, pm, round(speed, 6), round(offset_bin * max(1.0, speed) / SAMPLE_RATE, 6)))

    got_a, got_b, got_mirrored, got_speed, got_offset = _hypotheses(frames, a, b, mirrored, t_a, frame_a, t_b)
    got = {(int(x), int(y), bool(m), round(float(s), 6), round(float(o), 6))
           for x, y, m, s, o in zip(got_a, got_b, got_mirrored, got_speed, got_offset)}
    assert len(got) == len(got_a)  # no mapping twice
    assert got == expected and len(expected) > 50


def test_alignment_equals_a_plain_per_frame_check(monkeypatch):
    """Guards the chunked, in-place alignment: for random mappings (mirrored, every speed, offsets
    reaching past either end) the share of matching frames, their mean excess RMS and the matched
    span must equal a frame-by-frame loop that interpolates the other clip with np.interp and
    allows sqrt(w (1 - w)) of the step between its samples. Chunks of 50 rows split mappings."""
    monkeypatch.setattr(duplicates, "CHUNK_ROWS", 50)
    rng = np.random.default_rng(5)
    signatures = [clip_of(seed, 0.0, rng.uniform(1.5, 5.0)) for seed in range(4)]
    signatures.append(clip_of(0, 0.7, 2.0))  # part of clip 0: some mappings match
    noisy = clip_of(1, 0.0, signatures[1].duration + 1 / SAMPLE_RATE)
    signatures.append(Signature(noisy.times, noisy.hashes + rng.normal(0, 0.006, noisy.hashes.shape).astype(np.float32)))
    frames = _Frames.of(signatures)
    count = 300
    a, b = rng.integers(0, len(signatures), count), rng.integers(0, len(signatures), count)
    mirrored = rng.random(count) < 0.2
    speed = rng.choice(SPEEDS, count)
    offset = rng.uniform(-2, 3, count)
    a[:40], b[:40], speed[:40], mirrored[:40] = 4, 0, 1.0, False  # near the true mapping of clip 4 into clip 0
    offset[:40] = 0.7 + rng.uniform(-0.1, 0.1, 40)
    a[40:60], b[40:60], speed[40:60], mirrored[40:60], offset[40:60] = 5, 1, 1.0, False, rng.uniform(-0.05, 0.05, 20)

    share, distance, first, last, _ = _verify(frames, a, b, mirrored, speed, offset)

    for i in range(count):
        mine_clip = signatures[a[i]].mirrored() if mirrored[i] else signatures[a[i]]
        other = signatures[b[i]]
        mapped = offset[i] + speed[i] * mine_clip.times.astype(np.float64)
        slack = 0.5 / SAMPLE_RATE * max(1.0, speed[i])
        inside = (mapped >= other.times[0] - slack) & (mapped <= other.times[-1] + slack)
        position = np.interp(mapped, other.times, np.arange(len(other.times)))
        low = np.minimum(np.floor(position).astype(int), len(other.times) - 2)
        weight = position - low
        theirs = other.hashes[low] * (1 - weight[:, None]) + other.hashes[low + 1] * weight[:, None]
        rms = np.sqrt(np.mean((mine_clip.hashes - theirs) ** 2, axis=1))
        step = np.sqrt(np.mean((other.hashes[low + 1] - other.hashes[low]) ** 2, axis=1))
        bend = np.full(len(other.times), np.inf)  # RMS of the second difference; none at either end
        bend[1:-1] = np.sqrt(np.mean((other.hashes[2:] - 2 * other.hashes[1:-1] + other.hashes[:-2]) ** 2, axis=1))
        scale = np.minimum(step, np.maximum(bend[low], bend[low + 1]))
        excess = np.maximum(rms - np.sqrt(weight * (1 - weight)) * scale, 0.0)
        good = inside & (excess <= FRAME_MATCH)
        expected_share = good.sum() / inside.sum() if inside.sum() >= MIN_FRAMES else 0.0
        assert share[i] == pytest.approx(expected_share, abs=1e-9), i
        if good.any():
            assert distance[i] == pytest.approx(excess[good].mean(), abs=1e-5), i
        else:
            assert distance[i] == np.inf
        if inside.any():
            assert (first[i], last[i]) == pytest.approx((mine_clip.times[inside][0], mine_clip.times[inside][-1]))
    assert (share[:60] > 0.9).sum() >= 30  # the reference is exercised on matching mappings too


def test_interpolation_allowance_is_what_fast_movement_between_samples_needs():
    """Guards the rule that replaced "a quarter of the frames may be off": where each cell changes
    at an unknown moment between two samples (movement fast against the sampling), a copy sampled
    half-way between the original's samples misses the linear mix by half the step, on every
    moving frame. Without the allowance nearly every frame fails; with it every frame matches."""
    rng = np.random.default_rng(2)
    samples = 24
    # Each cell jumps to a new level at a random moment inside each sample interval.
    levels = np.cumsum(rng.normal(0, 0.08, (samples + 1, CELLS)), axis=0)
    jumps = rng.random((samples, CELLS))  # when, as a fraction of the interval

    def frame_at(t: float) -> np.ndarray:
        k = min(int(np.floor(t * SAMPLE_RATE)), samples - 1)
        return np.where(t * SAMPLE_RATE - k >= jumps[k], levels[k + 1], levels[k])

    original = np.stack([levels[k] for k in range(samples)]).astype(np.float32)
    times = np.arange(samples) / SAMPLE_RATE
    between = np.stack([frame_at(t + 0.5 / SAMPLE_RATE) for t in times[:-1]]).astype(np.float32)
    frames = _Frames.of([Signature(times[:-1].astype(np.float32), between), Signature(times.astype(np.float32), original)])
    share, *_ = _verify(frames, np.array([0]), np.array([1]), np.array([False]), np.array([1.0]),
                             np.array([0.5 / SAMPLE_RATE]))
    raw = np.sqrt(np.mean((between - (original[:-1] + original[1:]) / 2) ** 2, axis=1))
    step = np.sqrt(np.mean((original[1:] - original[:-1]) ** 2, axis=1))
    assert (raw > FRAME_MATCH).mean() > 0.9  # what the old rule saw
    np.testing.assert_allclose(_excess_rms(raw, np.full(len(raw), 0.5), step), 0.0, atol=1e-6)
    assert share[0] == 1.0


@pytest.mark.parametrize("start, seconds, speed, mirror, kind", [
    (1.3, 2.0, 1.0, False, "sub-span"),  # a third of the bout, cut off the sampling grid
    (0.55, 3.0, 0.5, True, "sub-span"),  # a mirrored half-speed replay of 1.5 s of it
    (0.0, 6.0, 1.0, True, "same footage"),
])
def test_constructed_copy_is_found_with_its_relation_and_span(start, seconds, speed, mirror, kind):
    """Guards the whole search on footage built in code: a trim, a slowed mirrored replay and a
    mirrored copy of a 6 s clip among unrelated clips give exactly one relation each, stating what
    was done (mirroring, speed, kind) and where (the copy's span maps onto footage time start +
    speed * t, within a sample), with the movement agreeing."""
    original = clip_of(7, 0.0, 6.0)
    copy = clip_of(7, start, seconds, speed)
    if mirror:
        copy = copy.mirrored()
    others = [clip_of(seed, 0.0, 6.0) for seed in (11, 12, 13)]
    (relation,) = find_relations([original, *others, copy])
    if relation.clip == 0:
        relation = relation.reversed()
    assert (relation.clip, relation.original, relation.kind, relation.mirrored) == (4, 0, kind, mirror)
    assert relation.speed == pytest.approx(speed)
    clip_start, clip_end = relation.span_in_clip
    assert clip_end - clip_start >= CONTAINED * copy.duration
    expected = (start + speed * clip_start, start + speed * clip_end)
    assert relation.span_in_original == pytest.approx(expected, abs=1 / SAMPLE_RATE)
    assert relation.motion > 0.95 and relation.distance < FRAME_MATCH / 4


@pytest.mark.parametrize("difference, related", [(0.004, True), (0.010, False)])
def test_a_look_alike_that_differs_a_little_on_every_frame_is_not_a_copy(difference, related):
    """Guards the tightened frame tolerance: the same movement with a fixed difference of RMS 0.010
    on every frame (another bout of the same stage: athletes a few pixels apart) is not a copy,
    while one of RMS 0.004 (codec noise, letterboxing) is. The old rule (RMS 0.012, a quarter of the
    frames off) took both."""
    original = clip_of(21, 0.0, 6.0)
    pattern = np.random.default_rng(4).normal(0, 1, CELLS)
    pattern -= pattern.mean()
    pattern *= difference / np.sqrt(np.mean(pattern**2))
    look_alike = Signature(original.times, original.hashes + pattern.astype(np.float32))
    relations = find_relations([original, clip_of(22, 0.0, 6.0), look_alike])
    assert [(r.clip, r.original) in ((0, 2), (2, 0)) for r in relations] == ([True] if related else [])


@pytest.mark.parametrize("seed", [0, 2])
def test_a_short_demo_clip_and_its_noisy_copy_alone_are_related_at_speed_one(seed, monkeypatch):
    """Guards the vote cap per other clip: with only two clips, a frame of a short, mostly still
    clip has nearly all the other clip's frames among its nearest; if each of them voted, every
    offset and the slower speeds (which pack more votes into a bin) outvote the true mapping, and
    a re-encoded copy went unflagged (tests/test_curate.py's planted copy). The clip is drawn by
    trainer/demo_data.py and fingerprinted as the probe does; the copy adds pixel noise."""
    import random

    from trainer.curate.fingerprint import FrameSampler, footage_signature
    from trainer.demo_data import CAMERAS, COLOURS, FPS, OUTCOMES, SECONDS, DemoClip, render_frame

    rng = random.Random(seed)
    striker, defender = rng.sample(sorted(COLOURS), 2)
    clip = DemoClip(striker_on_left=rng.random() < 0.5, striker_colour=striker, defender_colour=defender,
                    outcome=OUTCOMES[seed % len(OUTCOMES)], camera=rng.choice(CAMERAS), backdrop=round(rng.uniform(0.25, 0.45), 3))
    count = int(FPS * SECONDS)
    frames = np.stack([render_frame(clip, i / (count - 1)) for i in range(count)])
    noisy = np.clip(frames + np.random.default_rng(seed).normal(0, 0.01, frames.shape), 0, 1).astype(np.float32)

    def fingerprint(video: np.ndarray) -> Signature:
        sampler = FrameSampler()
        for index, frame in enumerate(video):
            sampler.offer(index / FPS, frame @ np.array([0.299, 0.587, 0.114], np.float32))
        return footage_signature(sampler)

    pair = [fingerprint(frames), fingerprint(noisy)]
    (relation,) = find_relations(pair)
    assert (relation.kind, relation.speed, relation.mirrored) == ("same footage", 1.0, False)
    assert relation.span_in_original == pytest.approx(relation.span_in_clip, abs=1 / SAMPLE_RATE)
    monkeypatch.setattr(duplicates, "NEAREST_PER_CLIP", 2 * duplicates.NEIGHBOURS)  # every neighbour votes
    assert all(r.speed != 1.0 for r in find_relations(pair))
