"""Encode every clip with the VAE and every caption with T5 once; training reads only this cache.

One safetensors file per (clip bytes, caption, model, resolution, frames, fps), named by the hash
of all of them, so a changed clip or caption is re-encoded and everything else is reused. A TIC-FT
run (`ticft` in the config) encodes the condition and target as one clip in one VAE pass, and its
keys add the layout, the condition source and, for a pairs dataset, the condition file's bytes: the
VAE's latents of the target depend on what precedes it. Each entry
records the factors of the VAE that encoded it (`VaeFactors`: spatial, temporal, scaling factor, and a
per-channel mean and std for a family that normalises so, absent from older entries, which read as they
were written), so training normalises latents as belongs to them. Files are written atomically, so an
interrupted run resumes where it stopped and never leaves a half-written entry. A clip that cannot
be decoded is reported and skipped. Beside a GPU, the next clips are decoded while one is encoded
(`trainer.read_ahead`).

An entry found on disk is checked before it is reused, from its header alone (no tensor is read):
it must open as safetensors and hold the expected tensors and metadata. A damaged entry (a disk
that filled up, a copy cut short, a hand edit) is reported and encoded again, so no rerun needs
a hand fix. The file-hash index is only a speed-up: an unreadable one is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from slapgen.atomic import atomic_write_bytes, atomic_write_text
from slapgen.errors import first_line
from slapgen.models.family import ModelFamily, VaeFactors, family_of
from slapgen.models.loading import ResolvedModel, load_pipeline
from slapgen.models.specs import DEFAULT_FAMILY, ModelSpec
from trainer.config import DataConfig, TicftConfig
from trainer.datasets import Clip
from trainer.errors import ClipError, DatasetError
from trainer.frames import load_clip, load_ticft_clip
from trainer.read_ahead import read_ahead, reading_threads

CACHE_FORMAT = 4  # 2: entries record the VAE's factors; 3: frames are cut to the output's aspect before scaling;
# 4: a variable-frame-rate clip is read at the instants it was shot (trainer.frames._open)
HASH_INDEX = "file_hashes.json"
LAST_REPORT = "last_report.json"  # the last precompute's report: what was encoded, reused, skipped and repaired
# The skipped clips this process has named, by cache entry: a sweep scores every checkpoint of a run on the same
# held-out clips, and a walk-through's 2-run sweep named its one unreadable clip 16 times. Each report still lists it.
_NAMED_SKIPS: set[str] = set()
CLIP_TENSORS = frozenset({"latent_mean", "latent_logvar", "prompt_embeds"})
PROMPT_TENSORS = frozenset({"prompt_embeds"})


def model_identity(resolved: ResolvedModel) -> str:
    # A hub snapshot folder is named by its commit, so a new revision gets new cache keys. The family is
    # part of it (a VAE's latents and normalisation, a text encoder's embeddings are the family's), so two
    # folders of one name in different families never share an entry; the default family's identity is
    # the one written before families existed, so existing caches keep their keys.
    identity = f"{resolved.spec.name}@{resolved.folder.name}"
    return identity if resolved.spec.family == DEFAULT_FAMILY else f"{identity}#{resolved.spec.family}"


def _sha256(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class FileHasher:
    """sha256 of file contents, remembered by (path, size, mtime) so re-runs do not re-read clips."""

    def __init__(self, index_path: Path):
        self.index_path = index_path
        self.known: dict[str, list] = self._read()
        self._hashed: dict[str, list] = {}  # the rows this hasher computed: what it adds to the index on disk

    def _read(self) -> dict[str, list]:
        try:
            known = json.loads(self.index_path.read_text())
        except (OSError, ValueError):  # missing, not UTF-8 or not JSON: start over
            known = {}
        return known if isinstance(known, dict) else {}

    def remembered(self, path: Path) -> str | None:
        """The digest of `path` if the index has it for the file as it is now (its size and mtime), without reading it."""
        stat = path.stat()
        remembered = self.known.get(str(path))
        # A hand-edited index may hold anything; only a well-formed [size, mtime, sha] row is trusted.
        if isinstance(remembered, list) and len(remembered) == 3 and remembered[:2] == [stat.st_size, stat.st_mtime_ns] \
                and isinstance(remembered[2], str):
            return remembered[2]
        return None

    def digest(self, path: Path) -> str:
        if (remembered := self.remembered(path)) is not None:
            return remembered
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        self.known[str(path)] = self._hashed[str(path)] = [*stamp, sha.hexdigest()]
        return sha.hexdigest()

    def save(self) -> None:
        """Merged with the index on disk, under a lock: the processes of a launch each encode a share of the clips
        into one cache (and runs may share one), and each wrote the index it knew, the last one's alone kept."""
        import fcntl

        with open(self.index_path.with_name(self.index_path.name + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: merged all the same, a race may lose an entry
                pass
            self.known = {**self._read(), **self._hashed}  # another's newer rows win over those read at the start
            atomic_write_text(self.index_path, json.dumps(self.known))


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    clip: Clip
    # The clip itself, whatever encodes it: its file's content, caption and condition file (the key adds the
    # model, size and cache format, which a release or another model revision changes while the clips do not).
    content: str = ""

    def vae_factors(self) -> VaeFactors:
        with safe_open(str(self.path), framework="pt") as handle:
            return VaeFactors.from_metadata(handle.metadata())

    def mean_latents(self, family: ModelFamily) -> torch.Tensor:
        """The clip's posterior mean, normalised as the transformer sees latents, batch 1 in `family`'s
        latent layout ((1, F, C, H, W) for CogVideoX)."""
        with safe_open(str(self.path), framework="pt") as handle:
            mean = handle.get_tensor("latent_mean").float()
            factors = VaeFactors.from_metadata(handle.metadata())
        normalised = factors.normalise(mean.unsqueeze(0), channel_dim=1)  # (1, C, F, H, W)
        order = ["BCFHW".index(axis) for axis in family.latent_layout]
        return normalised.permute(*order).contiguous()


@dataclass
class PrecomputeReport:
    entries: list[CacheEntry] = field(default_factory=list)
    encoded: int = 0
    reused: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    repaired: list[dict[str, str]] = field(default_factory=list)  # corrupt entries found and encoded again

    def skipped_by_reason(self) -> dict[str, int]:
        """How many clips were skipped for each reason, by reason's name."""
        return dict(sorted(Counter(skip["reason"] for skip in self.skipped).items()))

    def summary(self) -> str:
        skipped = ", ".join(f"{count} {reason}" for reason, count in self.skipped_by_reason().items()) or "none"
        repaired = f"; {len(self.repaired)} corrupt cache entries re-encoded" if self.repaired else ""
        ready = len(self.entries)
        return (f"{ready} clip{'s' * (ready != 1)} ready ({self.encoded} encoded, {self.reused} reused); "
                f"skipped: {skipped}{repaired}")

    def to_json(self) -> dict:
        return {
            "ready": len(self.entries),
            "encoded": self.encoded,
            "reused": self.reused,
            "skipped": self.skipped,
            "repaired": self.repaired,
            "entries": [{"video": e.clip.name, "key": e.key, "path": str(e.path)} for e in self.entries],
        }


class Encoders:
    """The VAE and T5 of a model, loaded without the transformer (which precompute never needs)."""

    def __init__(self, pipeline, spec: ModelSpec, device: str):
        self.spec = spec
        self.device = device
        self.pipeline = pipeline
        self.vae_factors = family_of(spec).vae_factors(pipeline.vae.config)
        self.pipeline.vae.enable_slicing()
        self.pipeline.vae.enable_tiling()
        self.pipeline.vae.to(device)
        self.pipeline.text_encoder.to(device)

    @classmethod
    def load(cls, resolved: ResolvedModel, device: str) -> "Encoders":
        return cls(load_pipeline(resolved, transformer=None), resolved.spec, device)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, C, H, W) in [-1, 1] -> the VAE posterior's mean and log-variance, (C, F', H', W'). The clip
        goes in the VAE's own dtype, which a family may keep apart from the spec's (Wan's is float32)."""
        video = frames.permute(1, 0, 2, 3).unsqueeze(0).to(self.device, self.pipeline.vae.dtype)
        posterior = self.pipeline.vae.encode(video).latent_dist
        return posterior.mean[0].cpu(), posterior.logvar[0].cpu()

    @torch.no_grad()
    def encode_prompt(self, text: str) -> torch.Tensor:
        """T5 embeddings exactly as the pipeline computes them at inference, (seq, dim)."""
        embeds, _ = self.pipeline.encode_prompt(
            text,
            do_classifier_free_guidance=False,
            max_sequence_length=self.spec.max_sequence_length,
            device=self.device,
            dtype=self.spec.torch_dtype,
        )
        return embeds[0].cpu()


class LatentCache:
    def __init__(self, root: Path, resolved: ResolvedModel, data: DataConfig, device: str = "cpu",
                 ticft: TicftConfig | None = None):
        self.root = Path(root)
        self.resolved = resolved
        self.data = data
        self.device = device
        self.ticft = ticft
        self._encoders: Encoders | None = None

    @property
    def encoders(self) -> Encoders:
        if self._encoders is None:  # loaded on the first miss only: a warm cache costs no model load
            self._encoders = Encoders.load(self.resolved, self.device)
        return self._encoders

    def clip_key(self, file_hash: str, caption: str, condition_hash: str = "") -> str:
        d = self.data
        parts = [f"v{CACHE_FORMAT}", file_hash, caption, model_identity(self.resolved), f"{d.height}x{d.width}",
                 f"{d.num_frames}@{d.fps:g}"]
        if self.ticft is not None:  # plain runs keep their keys
            parts += [f"ticft:{self.ticft.layout}:{self.ticft.condition}", condition_hash]
        return _sha256(*parts)

    def _condition_file(self, clip: Clip) -> Path | None:
        """The file besides the video that the clip's entry is made of: its condition, with TIC-FT pairs."""
        return clip.condition if self.ticft is not None and self.ticft.condition == "pairs" else None

    def _condition_hash(self, clip: Clip, hasher: "FileHasher") -> str:
        condition = self._condition_file(clip)
        return "" if condition is None else hasher.digest(condition)

    def _entry(self, clip: Clip, hasher: "FileHasher") -> CacheEntry:
        identity = (hasher.digest(clip.video), clip.caption or "", self._condition_hash(clip, hasher))
        key = self.clip_key(*identity)
        return CacheEntry(key, self._path("clips", key), clip, _sha256(*identity))

    def _entry_if_remembered(self, clip: Clip, hasher: "FileHasher") -> CacheEntry | None:
        """`_entry`, when the hash index knows every file of the clip as it is now (no video read); else None."""
        files = [clip.video] + ([condition] if (condition := self._condition_file(clip)) is not None else [])
        try:
            known = all(hasher.remembered(path) is not None for path in files)
        except OSError:  # a missing file: the loop names it
            return None
        return self._entry(clip, hasher) if known else None

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def check_clips(self, clips: list[Clip]) -> None:
        """DatasetError for rows this cache cannot encode as given (a TIC-FT pairs run's rows without a condition),
        said of all of them: a launch whose processes encode shares checks the whole list first."""
        if self.ticft is not None and self.ticft.condition == "pairs":
            missing = [clip.name for clip in clips if clip.condition is None]
            if missing:
                raise DatasetError(f"ticft.condition is pairs, but {len(missing)} rows name no condition (first: "
                                   f"{missing[0]}); add a `condition` column with an image or clip per row")

    def precompute(self, clips: list[Clip], progress: bool = True, keep_report: bool = True) -> PrecomputeReport:
        """Every clip's entry, encoded where the cache lacks it. The report is kept in the cache's `last_report.json`
        (`write_report`) unless not `keep_report`: a launch's shares keep the one that adds them up."""
        from trainer.progress import progress_bar

        self.check_clips(clips)
        self.root.mkdir(parents=True, exist_ok=True)
        hasher = FileHasher(self.root / HASH_INDEX)
        report = PrecomputeReport()
        entries: list[CacheEntry | None] = [None] * len(clips)  # in the clips' order, however they were cached
        # The clips cached already, found first (their files' digests remembered, no video read), count as done
        # from the start: the bar's rate and ETA are then the encoding's. Counted in it, a precompute resumed with
        # 109 of 600 clips cached showed 14.7 clips/s and 32 s left for 140 s of encoding.
        left: list[tuple[int, CacheEntry | None]] = []
        for index, clip in enumerate(clips):
            entry = self._entry_if_remembered(clip, hasher)
            if entry is not None and _reusable(entry.path, CLIP_TENSORS, clip.name, report,
                                               lambda line: print(line, file=sys.stderr)):
                entries[index] = entry
                report.reused += 1
            else:  # an entry known to need encoding goes straight to it (its problem said once)
                left.append((index, entry))
        bar = progress_bar(total=len(clips), initial=report.reused, desc="precompute", unit="clip",
                           disable=not progress, postfix={"encoded": 0, "reused": report.reused, "skipped": 0})

        def say(line: str) -> None:  # on stderr with the bar: `slapgen precompute` keeps stdout for its JSON
            bar.write(line, file=sys.stderr)

        planned: set[str] = set()  # keys this loop encodes: a row repeated (oversampling) is encoded once

        def plan():  # (index, entry), whether to encode it: decided ahead of the encoding, in the clips' order
            for index, known in left:
                clip = clips[index]
                entry = known or self._entry(clip, hasher)
                if entry.key in planned or (known is None
                                            and _reusable(entry.path, CLIP_TENSORS, clip.name, report, say)):
                    yield (index, entry), False
                else:
                    planned.add(entry.key)
                    yield (index, entry), True

        failed: dict[str, dict] = {}  # key -> the skip of its clip: a repeated row is skipped alike, not decoded again
        try:
            with closing(read_ahead(plan(), lambda planned_entry: self._frames(clips[planned_entry[0]]),
                                    reading_threads(self.device))) as steps:
                for (index, entry), frames in steps:
                    clip = clips[index]
                    if frames is None:
                        if entry.key in failed:
                            report.skipped.append({**failed[entry.key], "video": clip.name})
                        else:
                            report.reused += 1
                            entries[index] = entry
                    elif self._encode_clip(clip, frames, entry.path, report, say):
                        report.encoded += 1
                        entries[index] = entry
                    else:
                        failed[entry.key] = report.skipped[-1]
                    # the postfix first, drawn with the count (a count drawn before it showed "8/8 ... encoded=7")
                    bar.set_postfix(encoded=report.encoded, reused=report.reused, skipped=len(report.skipped),
                                    refresh=False)
                    bar.update(1)
        finally:
            bar.close()
            hasher.save()
        report.entries = [entry for entry in entries if entry is not None]
        if keep_report:
            self.write_report(report)
        return report

    def write_report(self, report: PrecomputeReport) -> None:
        atomic_write_text(self.root / LAST_REPORT, json.dumps(report.to_json(), indent=2))

    def _frames(self, clip: Clip) -> torch.Tensor:
        """The clip's frames as the VAE takes them (`trainer.frames`); raises ClipError. Run in a reading thread."""
        d = self.data
        if self.ticft is None:
            return load_clip(clip.video, d.num_frames, d.fps, d.height, d.width)
        return load_ticft_clip(clip.video, self._condition_file(clip), self.ticft.parsed_layout, d.fps, d.height,
                               d.width)

    def _encode_clip(self, clip: Clip, frames: Future, path: Path, report: PrecomputeReport, say) -> bool:
        """Encode `clip`, its frames read by `frames` (`_frames`), into the entry at `path`; False (reported in
        `report.skipped`) if it cannot be decoded."""
        condition = self._condition_file(clip)
        try:
            frames = frames.result()
        except ClipError as error:
            report.skipped.append({"video": clip.name, "reason": error.reason, "detail": str(error)})
            if str(path) not in _NAMED_SKIPS:
                _NAMED_SKIPS.add(str(path))
                say(f"skipped {clip.name}: {error}")
            return False
        mean, logvar = self.encoders.encode_video(frames)
        tensors = {
            "latent_mean": mean.contiguous(),
            "latent_logvar": logvar.contiguous(),
            "prompt_embeds": self.encoders.encode_prompt(clip.caption or "").contiguous(),
        }
        metadata = {"video": clip.name, "caption": clip.caption or "", **self.encoders.vae_factors.to_metadata()}
        if self.ticft is not None:
            metadata.update(ticft_layout=self.ticft.layout, ticft_condition=condition.name if condition else "first-frame")
        _atomic_save(tensors, path, metadata)
        return True

    def prompt_embeddings(self, prompts: list[str]) -> list[torch.Tensor]:
        """T5 embeddings of free prompts (validation prompts, the empty negative), cached like clips."""
        result = []
        for prompt in prompts:
            key = _sha256(f"v{CACHE_FORMAT}", "prompt", prompt, model_identity(self.resolved))
            path = self._path("prompts", key)
            if not _reusable(path, PROMPT_TENSORS, "a prompt", None, print):
                _atomic_save({"prompt_embeds": self.encoders.encode_prompt(prompt).contiguous()}, path, {"prompt": prompt})
            result.append(load_file(path)["prompt_embeds"])
        return result

    def release_encoders(self) -> None:
        self._encoders = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _reusable(path: Path, tensors: frozenset[str], what: str, report: PrecomputeReport | None, say) -> bool:
    """Whether the entry at `path` exists and is sound; a damaged one is said (and reported) so it is encoded again."""
    if not path.is_file():
        return False
    problem = entry_problem(path, tensors, vae_metadata=tensors == CLIP_TENSORS)
    if problem is None:
        return True
    if report is not None:
        report.repaired.append({"video": what, "path": str(path), "problem": problem})
    say(f"re-encoding {what}: its cache entry {path.name} {problem}")
    return False


def entry_problem(path: Path, tensors: frozenset[str], vae_metadata: bool = False) -> str | None:
    """Why the cache entry at `path` cannot be reused (a short phrase), or None when its header is sound.

    Reads the header only: safetensors checks that the header's offsets cover the file exactly, so a
    truncated or overwritten file fails here without a tensor being loaded.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            names, metadata = set(handle.keys()), handle.metadata() or {}
    except (OSError, SafetensorError) as error:
        return f"is not a readable safetensors file ({first_line(error)})"
    if names != tensors:
        return f"holds tensors {sorted(names)}, not {sorted(tensors)}"
    if vae_metadata:
        try:
            VaeFactors.from_metadata(metadata)
        except (KeyError, ValueError):
            return "lacks the VAE factors in its metadata"
    return None


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    # Serialised in memory (an entry is megabytes), then written through Python: safetensors' own file writer
    # reports a full disk as a SafetensorError with no errno, which no caller can tell from a bug.
    atomic_write_bytes(path, save(tensors, metadata=metadata))
