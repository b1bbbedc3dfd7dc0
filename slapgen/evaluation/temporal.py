"""VBench's reference-free temporal dimensions: subject consistency (DINO) and temporal flickering.

- subject_consistency: DINO CLS features f_i of every frame, L2-normalised; for each frame i >= 1,
  (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2, averaged over those frames
  (vbench/subject_consistency.py). Frames are resized so the shorter side is the model's
  image_size (224 for DINO ViT-B/16) as torchvision's Resize does on uint8 frames, scaled to [0, 1]
  and normalised with ImageNet's mean and std (VBench's `dino_transform`).
- temporal_flickering: (255 - mean absolute difference of consecutive uint8 frames) / 255
  (vbench/temporal_flickering.py). 1.0 for a still video.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

from slapgen.evaluation.frames import check_video

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def temporal_flickering(video: np.ndarray) -> float:
    video = check_video(video).astype(np.float64)
    if len(video) < 2:
        raise ValueError("temporal flickering needs at least 2 frames")
    differences = [np.abs(video[i] - video[i + 1]).mean() for i in range(len(video) - 1)]
    return float((255.0 - np.mean(differences)) / 255.0)


class DinoFeatures:
    """CLS features of a DINO (ViT or Dinov2) backbone, one per frame."""

    def __init__(self, model, batch_size: int = 16):
        self.model = model
        self.batch_size = batch_size
        self.image_size = int(model.config.image_size)
        self._device = next(model.parameters()).device
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def preprocess(self, video: np.ndarray) -> torch.Tensor:
        """VBench's `dino_transform(224)` on uint8 frames: torchvision's `Resize(224, antialias=False)`,
        `/ 255`, ImageNet normalisation. torchvision (not a dependency here) is followed exactly: the
        longer side is int(size * long / short), truncated, and a uint8 image resizes back to uint8."""
        frames = torch.from_numpy(check_video(video)).permute(0, 3, 1, 2).float()
        height, width = frames.shape[-2:]
        short, long = min(height, width), max(height, width)
        resized_long = int(self.image_size * long / short)
        size = (self.image_size, resized_long) if height <= width else (resized_long, self.image_size)
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=False)
        frames = frames.round() / 255.0
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (frames - mean) / std

    @torch.no_grad()
    def __call__(self, video: np.ndarray) -> torch.Tensor:
        pixels = self.preprocess(video)
        extra = {"interpolate_pos_encoding": True} if self._interpolate else {}
        features = [self.model(pixel_values=pixels[i:i + self.batch_size].to(self._device), **extra).last_hidden_state[:, 0]
                    for i in range(0, len(pixels), self.batch_size)]
        return F.normalize(torch.cat(features).float().cpu(), dim=-1)


def subject_consistency(features: torch.Tensor) -> float:
    """VBench's formula on per-frame features (T, D); needs at least 2 frames."""
    if len(features) < 2:
        raise ValueError("subject consistency needs at least 2 frames")
    features = F.normalize(features.double(), dim=-1)
    previous = (features[1:] * features[:-1]).sum(dim=-1).clamp(min=0)
    first = (features[1:] * features[0]).sum(dim=-1).clamp(min=0)
    return float(((previous + first) / 2).mean())
