"""I3D features for FVD, called the way StyleGAN-V calls its TorchScript I3D.

Each video goes in as uint8 [1, 3, T, H, W] with `rescale=True, resize=True, return_features=True`:
the model scales [0, 255] to [-1, 1], resizes frames to 224 x 224 itself, and returns the 400
Kinetics logits before the softmax. StyleGAN-V's FVD uses 16 consecutive frames from the start of
a generated clip (its real clips take a random 16-frame window by default); we take the start of
every clip, so a score does not depend on a random draw (`FVD_FRAMES`). The I3D needs at least 10 frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slapgen.evaluation.frames import check_video

if TYPE_CHECKING:  # imported where features are computed: `slapgen eval`'s checks read FVD_FRAMES without torch
    import torch

FVD_FRAMES = 16
I3D_MIN_FRAMES = 10


class I3DFeatures:
    def __init__(self, module: torch.jit.ScriptModule, device: str = "cpu", frames: int = FVD_FRAMES):
        self.module = module
        self.device = device
        self.frames = frames

    def __call__(self, video: np.ndarray) -> np.ndarray:
        """The feature vector of one video (its first `frames` frames)."""
        import torch

        video = check_video(video)
        if len(video) < I3D_MIN_FRAMES:
            raise ValueError(f"the I3D needs at least {I3D_MIN_FRAMES} frames, got {len(video)}")
        clip = torch.from_numpy(np.ascontiguousarray(video[: self.frames])).permute(3, 0, 1, 2).unsqueeze(0)
        with torch.no_grad():
            features = self.module(clip.to(self.device), rescale=True, resize=True, return_features=True)
        return features[0].double().cpu().numpy()

    def many(self, videos) -> np.ndarray:
        return np.stack([self(video) for video in videos])
