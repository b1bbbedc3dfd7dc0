"""torchao quantisation of the transformer's linear layers (`SLAP_QUANT`).

Only the transformer is quantised: it holds almost all of the compute and weights, while the VAE's
convolutions and T5 run once per request. LoRA layers are left in full precision so adapters can be
hot-swapped into them; their frozen base layers are quantised like any other linear layer.
"""

from __future__ import annotations

from typing import Literal

import torch

from slapgen.errors import QuantizationUnavailableError

Quantization = Literal["fp8", "fp8-weight", "int8", "none"]
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: float8 tensor cores


def fp8_capable(device: str) -> bool:
    return (device.startswith("cuda") and torch.cuda.is_available()
            and torch.cuda.get_device_capability(torch.device(device)) >= FP8_MIN_CAPABILITY)


def choose_quantization(requested: str, device: str) -> Quantization:
    """`auto` -> fp8 on a capable GPU, none elsewhere; an explicit fp8 that cannot run is an error."""
    if requested == "auto":
        return "fp8" if fp8_capable(device) else "none"
    if requested == "fp8" and not fp8_capable(device):
        where = ("this CPU" if not device.startswith("cuda")
                 else f"a GPU of compute capability {torch.cuda.get_device_capability(torch.device(device))}")
        raise QuantizationUnavailableError(
            f"SLAP_QUANT=fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper), not {where}; "
            "use SLAP_QUANT=fp8-weight, int8 or none."
        )
    return requested  # type: ignore[return-value]


def torchao_config(quantization: Quantization):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    return {
        # Per-row scales keep accuracy close to bf16 on CogVideoX (diffusers-torchao's choice).
        "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "fp8-weight": Float8WeightOnlyConfig,
        "int8": Int8WeightOnlyConfig,
    }[quantization]()


def is_quantizable_linear(module: torch.nn.Module, name: str) -> bool:
    """Base linear layers of the transformer; never LoRA's own A/B layers, which must stay swappable.
    float8 kernels need both dimensions to be multiples of 16."""
    if not isinstance(module, torch.nn.Linear) or ".lora_" in f".{name}":
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_transformer(transformer: torch.nn.Module, quantization: Quantization) -> int:
    """Quantise in place; returns how many linear layers were quantised."""
    if quantization == "none":
        return 0
    from torchao.quantization import quantize_

    chosen = [name for name, module in transformer.named_modules() if is_quantizable_linear(module, name)]
    quantize_(transformer, torchao_config(quantization), filter_fn=is_quantizable_linear)
    return len(chosen)
