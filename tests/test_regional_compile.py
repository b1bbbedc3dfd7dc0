"""SLAP_COMPILE_SCOPE: regional compilation (each repeated block compiled in place, one compiled code for all of
them) so a replica's start-up compile does not grow with the model's depth, and the whole-transformer compile
kept as the other choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slapgen.engine.compiling import CompiledTransformer
from slapgen.engine.params import GenerationParams
from slapgen.errors import SettingsError
from slapgen.models.family import family_of
from slapgen.models.loading import load_pipeline, resolve_model
from slapgen.serving.settings import load_settings


def test_the_compile_scope_setting_reaches_the_engine(monkeypatch):
    """Guards SLAP_COMPILE_SCOPE being ignored (the engine compiling its default whatever was asked), a typo
    accepted, or a scope given without SLAP_COMPILE passing silently: blocks by default, transformer when asked,
    a bad value one sentence naming the choices, and a scope nothing uses said at start-up."""
    monkeypatch.setenv("SLAP_DEVICE", "cpu")
    monkeypatch.setenv("SLAP_COMPILE", "1")
    assert load_settings().engine_options().compile_scope == "blocks"
    monkeypatch.setenv("SLAP_COMPILE_SCOPE", "transformer")
    assert load_settings().engine_options().compile_scope == "transformer"
    assert load_settings().ineffective() == []
    monkeypatch.setenv("SLAP_COMPILE", "0")
    assert load_settings().ineffective() == ["SLAP_COMPILE_SCOPE=transformer is not used: nothing is compiled "
                                             "without SLAP_COMPILE=1"]
    monkeypatch.setenv("SLAP_COMPILE_SCOPE", "block")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value) == "invalid settings: SLAP_COMPILE_SCOPE: Input should be 'blocks' or 'transformer'."


def deeper_twin(pipeline, family, layers: int) -> None:
    """The pipeline's transformer replaced by a random one of the same config with `layers` blocks (seeded)."""
    config = {**pipeline.transformer.config, "num_layers": layers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layers)
        pipeline.transformer = type(pipeline.transformer).from_config(config).eval()
    assert len(family.transformer_blocks(pipeline.transformer)) == layers


@pytest.mark.slow
@pytest.mark.parametrize("model, graphs", [("tiny", 2), ("tiny-wan", 1)])
def test_regional_compilation_compiles_one_block_for_all(model, graphs, request):
    """Guards SLAP_COMPILE_SCOPE=blocks compiling every block on its own (dynamo guarding on each block's identity
    or its parameters: graphs, and the compile time, growing with depth, which is what made a 5B replica's start
    take minutes), or wrapping the whole transformer anyway: on 2-block and 5-block random twins of the family's
    tiny transformer the number of compiled graphs is the same (CogVideoX 2, as its first block takes a strided
    slice of the tokens; Wan 1), the pipeline keeps the transformer module itself (not dynamo's wrapper), every
    block runs through dynamo, and the frames equal the eager transformer's."""
    cache_dir = request.getfixturevalue("tiny_cache_dir" if model == "tiny" else "tiny_wan_cache_dir")
    resolved = resolve_model(model, cache_dir)
    family = family_of(resolved.spec)
    params = GenerationParams.defaults_for(resolved.spec, num_inference_steps=2, seed=5)
    counted = {}
    for layers in (2, 5):
        pipeline = load_pipeline(resolved)
        pipeline.set_progress_bar_config(disable=True)
        deeper_twin(pipeline, family, layers)

        def generate():
            generator = torch.Generator().manual_seed(params.seed)
            return pipeline(**params.pipeline_arguments(), generator=generator, output_type="np").frames[0]

        eager = generate()
        transformer = pipeline.transformer
        compiled = CompiledTransformer(scope="blocks")
        compiled.compile(pipeline)
        assert pipeline.transformer is transformer and transformer._compiled_call_impl is None
        assert all(block._compiled_call_impl is not None for block in family.transformer_blocks(transformer))
        frames = []
        compiled.warm_up(pipeline, lambda: frames.append(generate()))
        compiled.mark_warm()
        with torch._dynamo.config.patch(error_on_recompile=True):
            frames.append(generate())
        counted[layers] = compiled.graphs
        assert compiled.recompilations == 0
        for compiled_frames in frames:  # inductor's fused kernels round differently from eager: not bit-equal
            np.testing.assert_allclose(compiled_frames, eager, atol=1e-4)
        torch._dynamo.reset()
    assert counted == {2: graphs, 5: graphs}
