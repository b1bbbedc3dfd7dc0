"""LoRA layers on the transformer (peft) and their file format (diffusers' LoRA safetensors).

The file is what `CogVideoXPipeline.load_lora_weights` reads: keys `transformer.<module>.lora_A/B.weight`
and diffusers' `lora_adapter_metadata` (the peft config, so alpha survives). slapgen adds its own
metadata under `slapgen.*`: base model, rank, alpha, target modules, steps, the training config, and
for a TIC-FT run its layout (`slapgen.ticft_layout`), which tells the service it needs a condition image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save

from slapgen.atomic import atomic_path
from slapgen.models import lora_format
from slapgen.models.lora_format import DIFFUSERS_METADATA_KEY, TRANSFORMER_PREFIX
from slapgen.models.lora_format import WEIGHTS_FILE as LORA_FILENAME
from trainer.config import LoraConfig, TrainConfig
from trainer.errors import TrainError


def peft_config(lora: LoraConfig) -> PeftLoraConfig:
    if lora.target_modules is None:  # resolved by the config (`TrainConfig.with_model_defaults`), never guessed here
        raise ValueError("lora.target_modules is unset: resolve the config against its model first")
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        init_lora_weights=True,  # B = 0: training starts exactly at the base model
    )


def add_lora(transformer, lora: LoraConfig) -> None:
    """Freeze the transformer and add trainable LoRA layers to the target modules."""
    transformer.requires_grad_(False)
    transformer.add_adapter(peft_config(lora))


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """LoRA weights in diffusers' key layout, as contiguous CPU tensors."""
    state = get_peft_model_state_dict(transformer)
    return {f"{TRANSFORMER_PREFIX}{key}": value.detach().to("cpu").contiguous() for key, value in state.items()}


def save_lora(transformer, folder: Path, config: TrainConfig, base_model: str, steps: int) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` atomically; returns its path."""
    folder = Path(folder)
    adapter = peft_config(config.lora).to_dict()
    adapter = {f"{TRANSFORMER_PREFIX}{k}": (sorted(v) if isinstance(v, set) else v) for k, v in adapter.items()}
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(adapter, sort_keys=True, default=str),
        lora_format.BASE_MODEL_KEY: base_model,
        lora_format.RANK_KEY: str(config.lora.rank),
        lora_format.ALPHA_KEY: str(config.lora.alpha),
        lora_format.TARGET_MODULES_KEY: ",".join(config.lora.target_modules),
        lora_format.STEPS_KEY: str(steps),
        lora_format.CONFIG_KEY: config.model_dump_json(),
    }
    if config.ticft is not None:
        metadata[lora_format.TICFT_LAYOUT_KEY] = config.ticft.layout
    if config.data.trigger_word:
        metadata[lora_format.TRIGGER_WORD_KEY] = config.data.trigger_word
    path = folder / LORA_FILENAME
    # Serialised in memory and written by Python: safetensors' own file writer reports a full disk as a
    # SafetensorError, this write as the OSError (with its errno) the trainer stops on in one line.
    data = save(lora_state_dict(transformer), metadata=metadata)
    with atomic_path(path) as staging:
        staging.write_bytes(data)
    return path


def read_lora_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_lora_into(transformer, path: Path) -> None:
    """Restore LoRA weights saved by `save_lora` into a transformer that already has the adapter."""
    set_lora_state(transformer, load_file(str(path)), path)


def set_lora_state(transformer, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Put LoRA weights already read from `path` (diffusers' keys) into the transformer's adapter."""
    state = {key.removeprefix(TRANSFORMER_PREFIX): value for key, value in tensors.items()}
    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainError(f"{path} has keys this model lacks, e.g. {unexpected[0]}")
