"""torchao quantisation of the transformer's linear layers (SLAP_QUANT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.lora_slot import LoraSlot
from runtime.quantization import QuantizationUnavailableError, choose_quantization, fp8_capable, quantize_transformer
from runtime.tiny import build_tiny_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _generate(pipeline) -> np.ndarray:
    return pipeline("a power slap", num_frames=9, height=64, width=96, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).frames[0]


def _weight_types(transformer) -> dict[str, str]:
    return {name: type(m.weight).__name__ for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("mode, tensor_type", [("fp8-weight", "Float8Tensor"), ("int8", "Int8Tensor")])
def test_weight_only_quantization_covers_base_linears_but_not_lora(mode, tensor_type):
    pipeline = build_tiny_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    reference = _generate(pipeline)
    LoraSlot(pipeline, 4, TARGETS)
    count = quantize_transformer(pipeline.transformer, mode)
    types = _weight_types(pipeline.transformer)
    lora = {n: t for n, t in types.items() if ".lora_" in n}
    base = {n: t for n, t in types.items() if ".lora_" not in n}
    assert count == len(base) > 0
    assert set(base.values()) == {tensor_type}
    assert lora and set(lora.values()) == {"Parameter"}  # adapters stay swappable
    quantized = _generate(pipeline)
    assert quantized.shape == reference.shape and np.isfinite(quantized).all()
    assert np.abs(quantized - reference).mean() < 0.1  # close to full precision, not noise


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
    pipeline = build_tiny_pipeline().to("cuda", torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    assert choose_quantization("auto", "cuda") == "fp8"
    count = quantize_transformer(pipeline.transformer, "fp8")
    assert count > 0
    assert "Float8Tensor" in set(_weight_types(pipeline.transformer).values())
    assert np.isfinite(_generate(pipeline)).all()
