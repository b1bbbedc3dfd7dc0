"""Encode every clip with the VAE and every caption with T5 once; training reads only this cache.

One safetensors file per (clip bytes, caption, model, resolution, frames, fps), named by the hash
of all of them, so a changed clip or caption is re-encoded and everything else is reused. Each entry
records the factors of the VAE that encoded it (`VaeFactors`: spatial, temporal, scaling factor), so
training scales latents with the factor that belongs to them. Files are written atomically, so an
interrupted run resumes where it stopped and never leaves a half-written entry. A clip that cannot
be decoded is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slapgen.atomic import atomic_path, atomic_write_text
from slapgen.models.cogvideox import VaeFactors
from slapgen.models.loading import ResolvedModel, load_pipeline
from slapgen.models.specs import ModelSpec
from trainer.config import DataConfig
from trainer.datasets import Clip
from trainer.errors import ClipError
from trainer.frames import load_clip

CACHE_FORMAT = 2  # 2: entries record the VAE's factors
HASH_INDEX = "file_hashes.json"


def model_identity(resolved: ResolvedModel) -> str:
    # A hub snapshot folder is named by its commit, so a new revision gets new cache keys.
    return f"{resolved.spec.name}@{resolved.folder.name}"


def _sha256(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class FileHasher:
    """sha256 of file contents, remembered by (path, size, mtime) so re-runs do not re-read clips."""

    def __init__(self, index_path: Path):
        self.index_path = index_path
        try:
            self.known: dict[str, list] = json.loads(index_path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def digest(self, path: Path) -> str:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        remembered = self.known.get(str(path))
        if remembered and remembered[:2] == stamp:
            return remembered[2]
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        self.known[str(path)] = [*stamp, sha.hexdigest()]
        return sha.hexdigest()

    def save(self) -> None:
        atomic_write_text(self.index_path, json.dumps(self.known))


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    clip: Clip

    def vae_factors(self) -> VaeFactors:
        with safe_open(str(self.path), framework="pt") as handle:
            return VaeFactors.from_metadata(handle.metadata())


@dataclass
class PrecomputeReport:
    entries: list[CacheEntry] = field(default_factory=list)
    encoded: int = 0
    reused: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for skip in self.skipped:
            reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "none"
        return f"{len(self.entries)} clips ready ({self.encoded} encoded, {self.reused} reused); skipped: {skipped}"

    def to_json(self) -> dict:
        return {
            "ready": len(self.entries),
            "encoded": self.encoded,
            "reused": self.reused,
            "skipped": self.skipped,
            "entries": [{"video": e.clip.name, "key": e.key, "path": str(e.path)} for e in self.entries],
        }


class Encoders:
    """The VAE and T5 of a model, loaded without the transformer (which precompute never needs)."""

    def __init__(self, pipeline, spec: ModelSpec, device: str):
        self.spec = spec
        self.device = device
        self.pipeline = pipeline
        self.vae_factors = VaeFactors.from_config(pipeline.vae.config)
        self.pipeline.vae.enable_slicing()
        self.pipeline.vae.enable_tiling()
        self.pipeline.vae.to(device)
        self.pipeline.text_encoder.to(device)

    @classmethod
    def load(cls, resolved: ResolvedModel, device: str) -> "Encoders":
        return cls(load_pipeline(resolved, transformer=None), resolved.spec, device)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, C, H, W) in [-1, 1] -> the VAE posterior's mean and log-variance, (C, F', H', W')."""
        video = frames.permute(1, 0, 2, 3).unsqueeze(0).to(self.device, self.spec.torch_dtype)
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
    def __init__(self, root: Path, resolved: ResolvedModel, data: DataConfig, device: str = "cpu"):
        self.root = Path(root)
        self.resolved = resolved
        self.data = data
        self.device = device
        self._encoders: Encoders | None = None

    @property
    def encoders(self) -> Encoders:
        if self._encoders is None:  # loaded on the first miss only: a warm cache costs no model load
            self._encoders = Encoders.load(self.resolved, self.device)
        return self._encoders

    def clip_key(self, file_hash: str, caption: str) -> str:
        d = self.data
        return _sha256(
            f"v{CACHE_FORMAT}", file_hash, caption, model_identity(self.resolved), f"{d.height}x{d.width}",
            f"{d.num_frames}@{d.fps:g}",
        )

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def precompute(self, clips: list[Clip], progress: bool = True) -> PrecomputeReport:
        from tqdm.auto import tqdm

        self.root.mkdir(parents=True, exist_ok=True)
        hasher = FileHasher(self.root / HASH_INDEX)
        report = PrecomputeReport()
        bar = tqdm(clips, desc="precompute", unit="clip", disable=not progress)
        try:
            for clip in bar:
                key = self.clip_key(hasher.digest(clip.video), clip.caption or "")
                path = self._path("clips", key)
                if path.is_file():
                    report.reused += 1
                else:
                    try:
                        frames = load_clip(clip.video, self.data.num_frames, self.data.fps, self.data.height, self.data.width)
                    except ClipError as error:
                        report.skipped.append({"video": clip.name, "reason": error.reason, "detail": str(error)})
                        bar.write(f"skipped {clip.name}: {error}")
                        continue
                    mean, logvar = self.encoders.encode_video(frames)
                    tensors = {
                        "latent_mean": mean.contiguous(),
                        "latent_logvar": logvar.contiguous(),
                        "prompt_embeds": self.encoders.encode_prompt(clip.caption or "").contiguous(),
                    }
                    metadata = {"video": clip.name, "caption": clip.caption or "", **self.encoders.vae_factors.to_metadata()}
                    _atomic_save(tensors, path, metadata)
                    report.encoded += 1
                report.entries.append(CacheEntry(key, path, clip))
                bar.set_postfix(encoded=report.encoded, reused=report.reused, skipped=len(report.skipped))
        finally:
            hasher.save()
        atomic_write_text(self.root / "last_report.json", json.dumps(report.to_json(), indent=2))
        return report

    def prompt_embeddings(self, prompts: list[str]) -> list[torch.Tensor]:
        """T5 embeddings of free prompts (validation prompts, the empty negative), cached like clips."""
        result = []
        for prompt in prompts:
            key = _sha256(f"v{CACHE_FORMAT}", "prompt", prompt, model_identity(self.resolved))
            path = self._path("prompts", key)
            if not path.is_file():
                _atomic_save({"prompt_embeds": self.encoders.encode_prompt(prompt).contiguous()}, path, {"prompt": prompt})
            result.append(load_file(path)["prompt_embeds"])
        return result

    def release_encoders(self) -> None:
        self._encoders = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as staging:
        save_file(tensors, str(staging), metadata=metadata)
