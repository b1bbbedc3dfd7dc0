"""SLAP_COMPILE_SCOPE: regional compilation (each repeated block compiled in place, one compiled code for all of
them) so a replica's start-up compile does not grow with the model's depth, and the whole-transformer compile
kept as the other choice."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from slapgen.engine.params import GenerationParams
from slapgen.errors import SettingsError
from slapgen.models.family import family_of
from slapgen.models.loading import resolve_model
from slapgen.serving.settings import load_settings


def test_the_compile_scope_setting_reaches_the_engine(monkeypatch):
    """Guards SLAP_COMPILE_SCOPE not reaching the engine's options (which scope the engine then compiles:
    tests/test_adapters.py's hot-swap test), a typo accepted, or a scope given without SLAP_COMPILE passing
    silently: blocks by default, transformer when asked, a bad value one sentence naming the choices, and a scope
    given that nothing uses said at start-up (the default's value too, when given)."""
    monkeypatch.setenv("SLAP_DEVICE", "cpu")
    monkeypatch.setenv("SLAP_COMPILE", "1")
    assert load_settings().engine_options().compile_scope == "blocks"
    monkeypatch.setenv("SLAP_COMPILE_SCOPE", "transformer")
    assert load_settings().engine_options().compile_scope == "transformer"
    assert load_settings().ineffective() == []
    monkeypatch.setenv("SLAP_COMPILE", "0")
    assert load_settings().ineffective() == ["SLAP_COMPILE_SCOPE=transformer is not used: nothing is compiled "
                                             "without SLAP_COMPILE=1"]
    monkeypatch.setenv("SLAP_COMPILE_SCOPE", "blocks")  # given, even at the default: said too
    assert load_settings().ineffective() == ["SLAP_COMPILE_SCOPE=blocks is not used: nothing is compiled "
                                             "without SLAP_COMPILE=1"]
    monkeypatch.delenv("SLAP_COMPILE_SCOPE")
    assert load_settings().ineffective() == []
    monkeypatch.setenv("SLAP_COMPILE_SCOPE", "block")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value) == "invalid settings: SLAP_COMPILE_SCOPE must be 'blocks' or 'transformer', got \"block\"."


@pytest.mark.parametrize("batch", [2, 1])
def test_a_strided_slice_of_the_tokens_reaches_the_compiled_block_at_row_major_strides(batch):
    """Guards the copy in front of each compiled block (`_with_row_major_tensors`): a slice of the tokens (what
    CogVideoX's first block gets) and a fresh tensor of its shape must reach the compiled code with the same
    strides, or dynamo, which guards on strides, compiles the block twice. With a batch of 1 (no
    classifier-free guidance) the slice counts as contiguous, so `contiguous()` alone would pass it as it is:
    fails with 2 graphs. A tensor already at row-major strides is passed as it is (no copy per block), and what
    is not a tensor (the rotary embeddings' tuple) untouched."""
    from slapgen.engine.compiling import _with_row_major_tensors, row_major_strides

    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(lambda tokens, rotary: tokens * rotary[0], backend=counting)
    seen = []

    def block(tokens, *, rotary):
        seen.append((tokens, tokens.stride(), rotary))
        return compiled(tokens, rotary)

    joined = torch.randn(batch, 6, 8)  # 2 text tokens, then 4 video tokens
    rotary = (torch.tensor(2.0), torch.tensor(3.0))
    sliced = joined[:, 2:]
    fresh = torch.randn(batch, 4, 8)
    assert sliced.stride() != row_major_strides(sliced.shape)
    torch.testing.assert_close(_with_row_major_tensors(block, sliced, rotary=rotary), sliced * 2)
    torch.testing.assert_close(_with_row_major_tensors(block, fresh, rotary=rotary), fresh * 2)
    assert [strides for _, strides, _ in seen] == [(32, 8, 1), (32, 8, 1)]
    assert seen[1][0] is fresh and seen[0][2] is rotary and seen[1][2] is rotary
    assert len(graphs) == 1


def deeper_twin(monkeypatch, layers: int) -> None:
    """Every pipeline the engine loads gets a random transformer of the same config with `layers` blocks (seeded:
    the same weights for every load)."""
    import slapgen.engine.generator as generator_module

    load = generator_module.load_pipeline

    def load_deeper(resolved):
        pipeline = load(resolved)
        config = {**pipeline.transformer.config, "num_layers": layers}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layers)
            pipeline.transformer = type(pipeline.transformer).from_config(config).eval()
        return pipeline

    monkeypatch.setattr(generator_module, "load_pipeline", load_deeper)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-wan"])
def test_regional_compilation_compiles_one_block_for_all(model, monkeypatch, tmp_path, request):
    """Guards SLAP_COMPILE_SCOPE=blocks compiling every block on its own (a backend, guard or per-block attribute
    that makes dynamo compile each block's call again: graphs, and the compile time, growing with depth, which is
    what made a 5B replica's start take minutes), or wrapping the whole transformer anyway: through the engine
    (LoRA slot, attention processors, warm-up) on 2-block and 5-block random twins of the family's tiny
    transformer, one graph is compiled (without a step cache), the pipeline keeps the transformer module itself
    (not dynamo's wrapper), every block runs through dynamo, a second generation compiles nothing, and the frames
    equal the uncompiled engine's. Also guards the row-major copy in front of each block's compiled call: CogVideoX's
    first block gets strided slices of the tokens, which compiled a second graph for that block alone."""
    from slapgen.engine.generator import VideoGenerator
    from slapgen.engine.params import EngineOptions

    cache_dir = request.getfixturevalue("tiny_cache_dir" if model == "tiny" else "tiny_wan_cache_dir")
    resolved = resolve_model(model, cache_dir)
    family = family_of(resolved.spec)
    counted = {}
    for layers in (2, 5):
        deeper_twin(monkeypatch, layers)
        options = EngineOptions(adapters_dir=tmp_path / "adapters", max_lora_rank=4)
        params = GenerationParams.defaults_for(resolved.spec, num_inference_steps=2, seed=5)
        eager = VideoGenerator.load(resolved, options).generate_frames(params)
        started = time.perf_counter()
        engine = VideoGenerator.load(resolved, dataclasses.replace(options, compile=True, compile_scope="blocks"))
        load_s = time.perf_counter() - started
        transformer = engine.pipeline.transformer
        assert not hasattr(transformer, "_orig_mod") and transformer._compiled_call_impl is None
        blocks = family.transformer_blocks(transformer)
        assert len(blocks) == layers and all(block._compiled_call_impl is not None for block in blocks)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled_frames = engine.generate_frames(params)
        counted[layers] = engine.compiled.graphs
        assert engine.info()["recompilations"] == 0 and engine.info()["compile_scope"] == "blocks"
        # the compile happens in the warm-up, timed as start-up's last phases (GET /info), its VAE decodes apart
        # (moved out of the compile's phase, not counted twice)
        phases = engine.info()["startup_s"]
        assert list(phases)[-2:] == ["compile_and_warm_up", "warm_up_decode"]
        assert 0 < phases["warm_up_decode"] < phases["compile_and_warm_up"]
        assert sum(phases.values()) <= load_s + 0.01  # each rounded to the millisecond
        # inductor's fused kernels round differently from eager: close, not bit-equal
        np.testing.assert_allclose(compiled_frames, eager, atol=1e-4)
        torch._dynamo.reset()
    assert counted == {2: 1, 5: 1}


@pytest.mark.parametrize("asked, expected", [(None, "ATEN"), ("ATEN,TRITON", "ATEN,TRITON")])
def test_compiles_choose_aten_gemms_unless_asked(monkeypatch, asked, expected):
    """Guards fp8's minutes-long start-up compile coming back: inductor autotunes Triton templates for
    `torch._scaled_mm` even outside max-autotune, gated only by `max_autotune_gemm_backends` naming TRITON
    (`_use_autotune_backend("TRITON")` in `use_triton_template`). inductor lowers an inference graph inside its
    `compile_fx` call, so the spy reads the gate as that call begins, on a real graph: ATen only by default, and what
    TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS says when set (the GPU half, the autotuning itself:
    tests/test_quantization.py's GPU test)."""
    import torch._inductor.compile_fx as compile_fx_module
    from torch._inductor.utils import _use_autotune_backend

    from slapgen.engine.compiling import CompiledTransformer

    if asked is None:
        monkeypatch.delenv("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS", asked)
    seen = []
    real_compile_fx = compile_fx_module.compile_fx

    def spy(graph_module, example_inputs, *args, **kwargs):
        seen.append((torch._inductor.config.max_autotune_gemm_backends, _use_autotune_backend("TRITON")))
        return real_compile_fx(graph_module, example_inputs, *args, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    torch._dynamo.reset()
    before = torch._inductor.config.max_autotune_gemm_backends
    linear = torch.nn.Linear(8, 8)
    holder = type("Holder", (), {"transformer": linear})()
    compiled = CompiledTransformer(scope="transformer")
    compiled.compile(holder)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        assert torch.allclose(holder.transformer(x), linear(x), atol=1e-6)
    assert seen == [(expected, "TRITON" in expected)] and compiled.graphs == 1
    assert torch._inductor.config.max_autotune_gemm_backends == before  # set for slapgen's compiles only
