"""CLIP score of a video against its text: torchmetrics' definition, per frame, averaged.

score(video, text) = max(0, mean over sampled frames of 100 * cos(E_image(frame), E_text(text))),
the number torchmetrics' `CLIPScore` computes when fed the frames with the text repeated (its clamp
applies to the mean). Differences, on purpose:

- Text longer than the model's window (77 tokens for OpenAI CLIP; our captions are 50-100 words)
  is cut by the tokenizer, which keeps the start and end tokens, and the score is of the first
  window's worth of the caption. torchmetrics slices the token ids instead, which drops the end
  token whose hidden state CLIP pools, so its text embedding of a long caption no longer depends on
  the caption's content in the way CLIP was trained. `ClipScorer.text_coverage` reports how much
  of each text was read, and the report says it.
- The text embedding is computed once per text, the frames in one batch.

transformers 5 returns model outputs from `get_image_features` / `get_text_features`; the projected
embedding is their `pooler_output` (transformers 4 returned the tensor). Both are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slapgen.evaluation.frames import sample_frames
from slapgen.evaluation.models import ClipModel, short_name

FRAMES_PER_VIDEO = 16  # as FlagEval's CLIPSIM samples


def embedding(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass(frozen=True)
class TextCoverage:
    tokens: int  # tokens of the whole text, start and end included
    scored: int  # tokens the text encoder read

    @property
    def truncated(self) -> bool:
        return self.tokens > self.scored


class ClipScorer:
    def __init__(self, clip: ClipModel, frames_per_video: int = FRAMES_PER_VIDEO):
        self.clip = clip
        self.frames_per_video = frames_per_video
        self.metric_name = f"clip_score_{short_name(clip.source)}"
        self._device = next(clip.model.parameters()).device
        self._text_cache: dict[str, torch.Tensor] = {}

    def text_coverage(self, text: str) -> TextCoverage:
        tokens = len(self.clip.processor.tokenizer(text)["input_ids"])
        return TextCoverage(tokens, min(tokens, self.clip.text_window))

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        if text not in self._text_cache:
            tokens = self.clip.processor.tokenizer([text], padding=True, truncation=True,
                                                   max_length=self.clip.text_window, return_tensors="pt")
            features = embedding(self.clip.model.get_text_features(
                input_ids=tokens["input_ids"].to(self._device), attention_mask=tokens["attention_mask"].to(self._device)))
            self._text_cache[text] = torch.nn.functional.normalize(features.float(), dim=-1)[0]
        return self._text_cache[text]

    @torch.no_grad()
    def frame_scores(self, frames: np.ndarray, text: str) -> torch.Tensor:
        """100 * cos(image, text) for each of `frames` (uint8, (T, H, W, 3))."""
        images = [torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1) for frame in frames]
        pixels = self.clip.processor(images=images, return_tensors="pt")["pixel_values"].to(self._device)
        features = torch.nn.functional.normalize(embedding(self.clip.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return 100 * features @ self.text_embedding(text)

    def score(self, video: np.ndarray, text: str) -> float:
        scores = self.frame_scores(sample_frames(video, self.frames_per_video), text)
        return max(float(scores.mean()), 0.0)
