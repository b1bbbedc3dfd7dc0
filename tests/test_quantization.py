"""torchao quantisation of the transformer's linear layers (SLAP_QUANT)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slapgen.engine.lora_slot import LoraSlot
from slapgen.engine.quantization import choose_quantization, fp8_capable, quantize_transformer
from slapgen.errors import QuantizationUnavailableError
from slapgen.models.family import family_of_transformer
from slapgen.models.tiny import build_tiny_pipeline
from slapgen.models.tiny_wan import TINY_WAN_SPEC, build_tiny_wan_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Each family's tiny pipeline: CogVideoX (tiny) and Wan (tiny-wan, 5 frames: its VAE is slow on a CPU).
BUILDERS = {"tiny": build_tiny_pipeline, "tiny-wan": build_tiny_wan_pipeline}


def _generate(pipeline) -> np.ndarray:
    wan = family_of_transformer(pipeline.transformer).name == "wan"
    extra = {"max_sequence_length": TINY_WAN_SPEC.max_sequence_length} if wan else {}
    return pipeline("a power slap", num_frames=5 if wan else 9, height=64, width=96, num_inference_steps=2,
                    output_type="np", generator=torch.Generator().manual_seed(0), **extra).frames[0]


def _weight_types(transformer) -> dict[str, str]:
    return {name: type(m.weight).__name__ for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def fake_quantized(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The closed form of torchao's weight-only schemes, in fp32: one scale per output row.
    int8: scale = absmax / 127.5, q = round(w * (1 / scale)) clamped to [-128, 127], w' = q * scale.
    fp8 (e4m3): scale = absmax / 448, w' = float8(w / scale) * scale."""
    absmax = weight.abs().amax(dim=1, keepdim=True)
    if mode == "int8":
        scale = absmax / 127.5
        return torch.round(weight * (1.0 / scale)).clamp(-128, 127) * scale
    scale = absmax / FP8_MAX
    return (weight / scale).to(torch.float8_e4m3fn).float() * scale


def rounding_bound(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """Largest error rounding can make: half an int8 step (scale / 2); for e4m3 (3 mantissa bits) half
    an ulp, 2^-4 of the value, or half the smallest subnormal step (2^-10 x scale) near zero."""
    absmax = weight.abs().amax(dim=1, keepdim=True)
    if mode == "int8":
        return absmax / 127.5 / 2 * (1 + 1e-4)
    return torch.maximum(weight.abs() * 2**-4, absmax / FP8_MAX * 2**-10) * (1 + 1e-4)


def _transformer_output(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    with torch.no_grad():
        if family_of_transformer(transformer).name == "wan":  # (B, C, F, H, W); Wan builds its own RoPE
            latents = torch.randn(1, config.in_channels, 2, 8, 12, generator=generator)
            text = torch.randn(1, TINY_WAN_SPEC.max_sequence_length, config.text_dim, generator=generator)
            return transformer(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500.0]),
                               return_dict=False)[0]
        latents = torch.randn(1, 3, config.in_channels, 8, 12, generator=generator)
        text = torch.randn(1, config.max_text_seq_length, config.text_embed_dim, generator=generator)
        return transformer(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500]),
                           image_rotary_emb=None, return_dict=False)[0]


@pytest.mark.parametrize("model", BUILDERS)
@pytest.mark.parametrize("mode, tensor_type", [("fp8-weight", "Float8Tensor"), ("int8", "Int8Tensor")])
def test_weight_only_quantization_matches_its_closed_form(mode, tensor_type, model):
    """Guards a quantisation that quantises the wrong layers (LoRA A/B included), the wrong scale or
    grouping, or corrupts weights: every quantised layer must dequantise to the closed form of its
    scheme, and the whole transformer must compute what an fp32 copy holding those closed-form weights
    computes. A corrupted or mis-scaled layer is off by at least a quantisation step and fails. On tiny-wan
    the same holds for Wan's linear layers (self- and cross-attention, feed-forwards, embedders)."""
    pipeline = BUILDERS[model]()
    LoraSlot(pipeline.transformer, 4, TARGETS)
    transformer = pipeline.transformer
    reference = copy.deepcopy(transformer)
    original = {name: m.weight.detach().clone() for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    count = quantize_transformer(transformer, mode)

    types = _weight_types(transformer)
    lora = {n for n in types if ".lora_" in n}
    base = {n for n in types if ".lora_" not in n}
    assert count == len(base) > 0 and {types[n] for n in base} == {tensor_type}
    assert lora and {types[n] for n in lora} == {"Parameter"}  # adapters stay swappable
    for name in base:
        expected = fake_quantized(original[name], mode)
        dequantized = transformer.get_submodule(name).weight.dequantize().float()
        assert torch.allclose(dequantized, expected, rtol=0, atol=1e-6), name
        assert not torch.equal(dequantized, original[name]), name  # it really was quantised
        assert ((dequantized - original[name]).abs() <= rounding_bound(original[name], mode)).all(), name

    with torch.no_grad():
        for name in base:
            reference.get_submodule(name).weight.copy_(fake_quantized(original[name], mode))
    torch.testing.assert_close(_transformer_output(transformer), _transformer_output(reference), rtol=1e-4, atol=1e-5)
    assert np.isfinite(_generate(pipeline)).all()


def test_none_leaves_the_model_alone():
    pipeline = build_tiny_pipeline()
    assert quantize_transformer(pipeline.transformer, "none") == 0
    assert set(_weight_types(pipeline.transformer).values()) == {"Parameter"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_on_cpu_is_one_clear_sentence():
    assert choose_quantization("auto", "cpu") == "none"
    assert choose_quantization("int8", "cpu") == "int8"
    with pytest.raises(QuantizationUnavailableError) as error:
        choose_quantization("fp8", "cpu")
    message = str(error.value)
    assert "compute capability 8.9" in message and "SLAP_QUANT=fp8-weight" in message and "\n" not in message


@pytest.mark.gpu
@pytest.mark.skipif(not fp8_capable("cuda"), reason="needs a GPU of compute capability 8.9+")
def test_dynamic_fp8_quantizes_and_generates_on_gpu():
    """Guards fp8 (dynamic activation + weight) quantising the wrong layers or corrupting weights: each
    quantised weight dequantises to the per-row e4m3 closed form of its bf16 original."""
    pipeline = build_tiny_pipeline().to("cuda", torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    assert choose_quantization("auto", "cuda") == "fp8"
    transformer = pipeline.transformer
    original = {name: m.weight.detach().float().clone() for name, m in transformer.named_modules()
                if isinstance(m, torch.nn.Linear)}
    count = quantize_transformer(transformer, "fp8")
    quantized = [name for name, kind in _weight_types(transformer).items() if kind == "Float8Tensor"]
    assert count == len(quantized) > 0
    for name in quantized:
        dequantized = transformer.get_submodule(name).weight.dequantize().float()
        expected = fake_quantized(original[name], "fp8-weight")
        assert torch.allclose(dequantized, expected, rtol=2**-7, atol=1e-6), name  # bf16 scales round a little
    assert np.isfinite(_generate(pipeline)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not fp8_capable("cuda"), reason="needs a GPU of compute capability 8.9+")
def test_compiled_fp8_matmuls_are_not_autotuned_at_start_up(monkeypatch):
    """Guards fp8's minutes-long start-up compile (about 210 s for one CogVideoX-5B block on an H200): inductor
    autotunes Triton kernels for every fp8 matmul shape outside max-autotune too, unless slapgen's compiles name
    ATen alone (`slapgen.engine.compiling.gemm_backends`). An fp8 layer compiled the service's way benchmarks no
    kernel choice, its output matches eager's, and with TRITON allowed again the same compile does autotune (the
    cause, shown)."""
    from torch._dynamo.utils import counters

    from slapgen.engine.compiling import CompiledTransformer

    def autotunings(backends: str | None) -> tuple[int, torch.Tensor, torch.Tensor]:
        if backends is None:
            monkeypatch.delenv("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS", backends)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
        model = model.to("cuda", torch.bfloat16)
        quantize_transformer(model, "fp8")
        holder = type("Holder", (), {"transformer": model})()
        x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            eager = model(x)
        torch._dynamo.reset()
        counters.clear()
        CompiledTransformer(scope="transformer").compile(holder)
        with torch._inductor.config.patch(force_disable_caches=True), torch.inference_mode():
            compiled = holder.transformer(x)
        return counters["inductor"]["select_algorithm_autotune"], eager, compiled

    tuned, eager, compiled = autotunings(None)
    assert tuned == 0
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)  # bf16 outputs of the same fp8 kernels
    tuned_with_triton, _, _ = autotunings("ATEN,TRITON")
    assert tuned_with_triton > 0, ("no autotuning even with TRITON allowed: the slow fp8 compile has another cause, or "
                                   "torchao's kernel choice skipped torch._scaled_mm (mslk / fbgemm installed? see "
                                   "summary.json's packages)")
