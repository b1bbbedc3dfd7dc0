"""Tiny, randomly initialised evaluation models built in code: a CLIP with a character-level
tokenizer, a DINO-style ViT, and a TorchScript I3D stand-in with StyleGAN-V's call convention
`forward(videos uint8 [B, 3, T, H, W], rescale, resize, return_features)`.

They are written once under SLAP_CACHE_DIR/eval-tiny-v1 (atomically) and loaded by
`slapgen.evaluation.models` exactly as real weights are. Their numbers mean nothing; they prove the
plumbing and let tests compare our metric code with reference implementations.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slapgen.atomic import atomic_path

TINY_EVAL_VERSION = "eval-tiny-v1"
TINY_EVAL_SEED = 20261128
TINY_CLIP_TEXT_WINDOW = 77  # like OpenAI CLIP, so captions overflow it as real ones do
TINY_I3D_FEATURES = 16
_CHARACTERS = string.ascii_lowercase + string.digits + ".,;:'-!?"


class TinyI3D(nn.Module):
    """A 3D conv stand-in for StyleGAN-V's I3D: same inputs and keyword flags, `TINY_I3D_FEATURES` features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 12, kernel_size=(3, 4, 4), stride=(1, 4, 4))
        self.features = nn.Linear(24, TINY_I3D_FEATURES)
        self.logits = nn.Linear(TINY_I3D_FEATURES, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float()
        if rescale:  # uint8 [0, 255] -> [-1, 1]
            x = x / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False)
        hidden = torch.tanh(self.conv(x))
        pooled = torch.cat([hidden.mean(dim=(2, 3, 4)), hidden.std(dim=(2, 3, 4))], dim=1)
        features = self.features(pooled)
        if return_features:
            return features
        return torch.softmax(self.logits(features), dim=1)


def write_tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    with atomic_path(folder) as staging:
        staging.mkdir(parents=True)
        vocabulary = {}
        for token in ["<|startoftext|>", "<|endoftext|>", *_CHARACTERS, *(c + "</w>" for c in _CHARACTERS)]:
            vocabulary[token] = len(vocabulary)
        (staging / "vocab.json").write_text(json.dumps(vocabulary))
        (staging / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
        tokenizer = CLIPTokenizer(str(staging / "vocab.json"), str(staging / "merges.txt"),
                                  model_max_length=TINY_CLIP_TEXT_WINDOW)
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=TINY_CLIP_TEXT_WINDOW,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=16,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_EVAL_SEED)
            model = CLIPModel(config).eval()
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                     crop_size={"height": 32, "width": 32}),
                                  tokenizer=tokenizer)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return folder


def write_tiny_dino(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_EVAL_SEED + 1)
        model = ViTModel(config, add_pooling_layer=False).eval()
    with atomic_path(Path(folder)) as staging:
        model.save_pretrained(staging)
    return Path(folder)


def write_tiny_i3d(path: Path) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_EVAL_SEED + 2)
        scripted = torch.jit.script(TinyI3D().eval())
    with atomic_path(Path(path)) as staging:
        scripted.save(str(staging))
    return Path(path)


_WRITERS = {"clip": ("clip", write_tiny_clip), "dino": ("dino", write_tiny_dino), "i3d": ("i3d_torchscript.pt", write_tiny_i3d)}


def materialise_tiny_eval_model(kind: str, cache_dir: Path | None = None) -> Path:
    """The tiny `kind` model (clip, dino, i3d) under the slapgen cache, written on first use."""
    from slapgen.models.loading import default_cache_dir

    name, write = _WRITERS[kind]
    target = Path(cache_dir or default_cache_dir()) / TINY_EVAL_VERSION / name
    if not target.exists():
        try:
            write(target)
        except OSError:
            if not target.exists():
                raise  # another process finishing first is fine; anything else is not
    return target
