"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from trainer.config import OptimConfig
from trainer.errors import TrainConfigError


def make_optimizer(parameters, optim: OptimConfig) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon,
        weight_decay=optim.weight_decay,
    )
    if optim.optimizer == "adam":
        return torch.optim.Adam(parameters, **kwargs)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **kwargs)
    if not torch.cuda.is_available():
        raise TrainConfigError("optim.optimizer=adam8bit needs a CUDA GPU (bitsandbytes); use adam or adamw on CPU")
    try:
        import bitsandbytes
    except ImportError:
        raise TrainConfigError("optim.optimizer=adam8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.Adam8bit(parameters, **kwargs)


def make_lr_scheduler(optimizer, optim: OptimConfig, max_train_steps: int, num_processes: int):
    # accelerate steps a prepared scheduler once per process per optimizer step.
    return get_scheduler(
        optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=optim.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=optim.lr_num_cycles,
    )
