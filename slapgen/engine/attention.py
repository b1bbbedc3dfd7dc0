"""The transformer's attention kernel (`SLAP_ATTENTION`), chosen at start-up.

CogVideoX's attention processor calls `F.scaled_dot_product_attention` (SDPA) directly, so diffusers'
`set_attention_backend` never reaches it. The kernel is chosen instead by running that processor
inside a context (the model family's `kernel_attention_processor`):

- `sdpa`: the stock processor, untouched; PyTorch picks a kernel per call.
- `flash`, `efficient`, `cudnn`, `math`: SDPA restricted to that one backend (`sdpa_kernel`).
- `fa3`: torch's SDPA flash kernel switched to FlashAttention 3 (`activate_flash_attention_impl`,
  Hopper, needs the `flash_attn_interface` module), then SDPA restricted to flash.
- `fp8`: torchao's FP8 attention on FlashAttention 3 (Hopper): q, k, v quantised to float8 per call.
- `sage`: SageAttention (`sageattention` package, CUDA): int8 q/k, fp16 p/v.

Every kernel but `sdpa` is checked up front: a kernel that cannot run here raises
`AttentionUnavailableError` (one sentence) before the model loads, and runs once at the model's dtype
and head size before it is installed.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import get_args

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from slapgen.engine.params import AttentionKernel
from slapgen.errors import AttentionUnavailableError, first_line
from slapgen.models.family import family_of_transformer

ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)
# CogVideoX-2B and -5B attend with 64-dimensional heads; start-up checks before loading use it.
DEFAULT_HEAD_DIM = 64
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
    "fa3": SDPBackend.FLASH_ATTENTION,  # with torch's flash implementation switched to FA3
}
SAGE_HEAD_DIMS = (64, 96, 128)
HOPPER = 9  # compute capability major: FlashAttention 3 and its FP8 path exist only for sm90
FALLBACK = "use SLAP_ATTENTION=sdpa, which lets PyTorch pick a kernel that runs"


class ReplaceSdpa(TorchFunctionMode):
    """While active, calls of `F.scaled_dot_product_attention` without a mask or dropout go to `kernel(q, k, v)`
    ((batch, heads, tokens, head size) in and out); others keep torch's SDPA. torch.compile traces it."""

    def __init__(self, kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and _plain_attention(**kwargs):
            return self.kernel(*args)
        return func(*args, **kwargs)


def _plain_attention(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> bool:
    """No mask, dropout, causality, custom scale or grouped heads: what CogVideoX asks of SDPA."""
    return attn_mask is None and dropout_p == 0.0 and not is_causal and scale is None and not enable_gqa


def _sage_attention(query, key, value):
    from sageattention import sageattn

    return sageattn(query, key, value, tensor_layout="HND", is_causal=False)


def _fp8_attention(query, key, value):
    from torchao.prototype.attention.fp8_fa3.attention import fp8_fa3_sdpa

    return fp8_fa3_sdpa(query, key, value)


def kernel_context(kernel: AttentionKernel) -> Callable[[], AbstractContextManager]:
    """What the attention processor enters around each call for `kernel` (not `sdpa`)."""
    if kernel in SDPA_BACKENDS:
        backend = SDPA_BACKENDS[kernel]
        return lambda: sdpa_kernel(backend)
    replacement = {"sage": _sage_attention, "fp8": _fp8_attention}[kernel]
    return lambda: ReplaceSdpa(replacement)


def _where(device: str) -> str:
    if not device.startswith("cuda"):
        return "this CPU"
    return f"a GPU of compute capability {'.'.join(map(str, torch.cuda.get_device_capability(torch.device(device))))}"


def _requirement_missing(kernel: AttentionKernel, device: str) -> str | None:
    """Why `kernel` cannot run on `device` before trying it (a missing package, the wrong GPU), or None."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if kernel == "sage":
        if importlib.util.find_spec("sageattention") is None:
            return "the sageattention package is not installed (pip install sageattention)"
        if not cuda:
            return f"SageAttention runs only on a CUDA GPU, not on {_where(device)}"
    if kernel in ("fa3", "fp8"):
        if not cuda or torch.cuda.get_device_capability(torch.device(device))[0] != HOPPER:
            return f"it needs a Hopper GPU (compute capability 9.x), not {_where(device)}"
        impls = getattr(torch.nn.attention, "list_flash_attention_impls", lambda: [])()
        if "FA3" not in impls:
            return f"torch {torch.__version__} cannot switch its flash kernel to FlashAttention 3"
        if importlib.util.find_spec("flash_attn_interface") is None:
            return ("the flash_attn_interface module (FlashAttention 3, built from flash-attention's hopper/ folder) "
                    "is not installed")
    if kernel == "fp8" and importlib.util.find_spec("torchao.prototype.attention") is None:
        return "this torchao has no FP8 attention (torchao.prototype.attention)"
    return None


def _try_kernel(kernel: AttentionKernel, device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run `kernel` once on a small input of the model's dtype and head size; why it failed, or None."""
    if kernel == "sage" and head_dim not in SAGE_HEAD_DIMS:
        return f"SageAttention needs a head size of {', '.join(map(str, SAGE_HEAD_DIMS))}, and this model's is {head_dim}"
    query = torch.randn(1, 2, 128, head_dim, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with kernel_context(kernel)():
                F.scaled_dot_product_attention(query, query.clone(), query.clone())
            return None
        except Exception as error:  # noqa: BLE001 - any failure of the kernel means it cannot serve
            # torch explains in warnings why each SDPA backend was skipped; the error itself is generic.
            reasons = [first_line(w.message, 200).rstrip(".") for w in caught if "attention" in str(w.message).lower()]
            generic = "No viable backend" in str(error)
            detail = reasons[0] if reasons else "torch has no such kernel there" if generic else first_line(error, 200)
            return (f"it does not run for {str(dtype).removeprefix('torch.')} with head size {head_dim} on "
                    f"{_where(device)} ({detail.rstrip('.')})")


def check_attention(kernel: AttentionKernel, device: str, dtype: torch.dtype, head_dim: int = DEFAULT_HEAD_DIM) -> None:
    """Raise `AttentionUnavailableError` unless `kernel` can run on `device` for this dtype and head size.

    `fa3` and `fp8` are tried only by `apply_attention`, after FlashAttention 3 is switched on."""
    if kernel not in ATTENTION_KERNELS:
        raise AttentionUnavailableError(f"SLAP_ATTENTION={kernel} is not a kernel; use one of {', '.join(ATTENTION_KERNELS)}.")
    if kernel == "sdpa":
        return
    reason = _requirement_missing(kernel, device)
    if reason is None and kernel not in ("fa3", "fp8"):
        reason = _try_kernel(kernel, device, dtype, head_dim)
    if reason is not None:
        raise AttentionUnavailableError(f"SLAP_ATTENTION={kernel} cannot run here: {reason}; {FALLBACK}.")


def apply_attention(transformer: torch.nn.Module, kernel: AttentionKernel, device: str) -> int:
    """Make every attention of `transformer` run on `kernel`; returns how many attention modules now do
    (0 for `sdpa`, which keeps diffusers' processor untouched). Call before torch.compile."""
    dtype, head_dim = transformer.dtype, transformer.config.attention_head_dim
    check_attention(kernel, device, dtype, head_dim)
    if kernel == "sdpa":
        return 0
    if kernel in ("fa3", "fp8"):
        # Process-wide: this process serves one model with one kernel.
        torch.nn.attention.activate_flash_attention_impl("FA3")
        reason = _try_kernel(kernel, device, dtype, head_dim)
        if reason is not None:
            raise AttentionUnavailableError(f"SLAP_ATTENTION={kernel} cannot run here: {reason}; {FALLBACK}.")
    processors = transformer.attn_processors
    family = family_of_transformer(transformer)
    transformer.set_attn_processor(family.kernel_attention_processor(kernel_context(kernel)))
    return len(processors)
