"""WanFamily's engine-facing members on the tiny twin: the kernel attention processor, the step caches
that work on Wan, the LoRA targets, the specs and the loaders."""

import contextlib
import json
import re

import pytest
import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    FlowMatchEulerDiscreteScheduler,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    WanPipeline,
)

from slapgen.models.tiny_wan import TINY_WAN_SPEC, build_tiny_wan_pipeline, write_tiny_wan_model
from slapgen.models.wan import (
    WAN,
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    WAN22_TI2V_5B,
    size_multiple,
)


def _inputs(transformer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = transformer.config.in_channels
    return dict(hidden_states=torch.randn(1, channels, 3, 8, 12, generator=generator),
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 7, transformer.config.text_dim, generator=generator))


def test_kernel_processor_runs_every_attention_inside_the_context_and_keeps_the_output(monkeypatch):
    """Guards the kernel context reaching Wan's attention: every SDPA call (through diffusers'
    dispatch_attention_fn, native backend) happens inside the context, once per attention (2 per block),
    and the output equals the stock processor's."""
    transformer = build_tiny_wan_pipeline().transformer
    inputs = _inputs(transformer)
    with torch.no_grad():
        stock = transformer(**inputs, return_dict=False)[0]
    inside, calls = [False], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append(inside[0])
        return sdpa(*args, **kwargs)

    @contextlib.contextmanager
    def kernel():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    transformer.set_attn_processor(WAN.kernel_attention_processor(kernel))
    with torch.no_grad():
        ours = transformer(**inputs, return_dict=False)[0]
    assert calls == [True] * (2 * transformer.config.num_layers)
    torch.testing.assert_close(ours, stock)


def test_set_attention_backend_still_reaches_the_kernel_processor():
    """Guards that the subclass stays a dispatcher processor: `set_attention_backend` sets its backend."""
    transformer = build_tiny_wan_pipeline().transformer
    transformer.set_attn_processor(WAN.kernel_attention_processor(contextlib.nullcontext))
    transformer.set_attention_backend("_native_math")
    from diffusers.models.attention_dispatch import AttentionBackendName

    backends = {module.processor._attention_backend for module in transformer.modules() if hasattr(module, "processor")}
    assert backends == {AttentionBackendName._NATIVE_MATH}


def _block_calls(config_for, steps=6):
    pipeline = build_tiny_wan_pipeline()
    calls = []
    pipeline.transformer.blocks[-1].attn1.to_q.register_forward_hook(lambda *_: calls.append(1))
    if config_for is not None:
        pipeline.transformer.enable_cache(config_for(pipeline))
    hooked = [name for name, module in pipeline.transformer.named_modules()
              if name and getattr(getattr(module, "_diffusers_hook", None), "hooks", None)]
    latents = pipeline("a power slap match", num_frames=5, height=32, width=48, num_inference_steps=steps,
                       output_type="latent", max_sequence_length=TINY_WAN_SPEC.max_sequence_length,
                       generator=torch.Generator().manual_seed(0)).frames
    return len(calls), hooked, latents


def _cache_configs():
    hooks = WAN.step_cache_hooks
    return {
        "pab": lambda pipeline: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=(hooks.attention_pattern,),
            current_timestep_callback=lambda: pipeline.current_timestep),
        "fbc": lambda pipeline: FirstBlockCacheConfig(threshold=0.5),
        "taylorseer": lambda pipeline: TaylorSeerCacheConfig(
            cache_identifiers=[hooks.attention_pattern, hooks.feed_forward_pattern]),
    }


@pytest.mark.parametrize("kind", ["pab", "fbc", "taylorseer"])
def test_supported_step_caches_hook_wan_and_skip_block_work(kind):
    """Guards the family's cache patterns and its supported list: each supported cache hooks modules of the
    Wan transformer and runs the last block's attention fewer times than without a cache (2 calls a step)."""
    assert kind not in WAN.step_cache_hooks.unsupported
    baseline, _, _ = _block_calls(None)
    calls, hooked, latents = _block_calls(_cache_configs()[kind])
    assert hooked
    assert calls < baseline == 2 * 6
    assert torch.isfinite(latents).all()


def test_fastercache_is_not_supported_because_wan_runs_guidance_unbatched():
    """Guards the exclusion of FasterCache: on WanPipeline (conditional and unconditional passes as separate
    batch-1 calls) diffusers 0.42.1's FasterCache fails; when diffusers fixes it this test says so."""
    assert "fastercache" in WAN.step_cache_hooks.unsupported

    def faster(pipeline):
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            low_frequency_weight_update_timestep_range=(99, 641), high_frequency_weight_update_timestep_range=(-1, 301),
            spatial_attention_block_identifiers=(WAN.step_cache_hooks.attention_pattern,),
            attention_weight_callback=lambda _: 0.3, tensor_format=WAN.step_cache_hooks.hidden_states_layout,
            current_timestep_callback=lambda: pipeline.current_timestep)

    with pytest.raises(IndexError):
        _block_calls(faster)


def test_lora_targets_are_every_attention_projection():
    """Guards the LoRA targets: 4 projections x (self + cross attention) x every block, all Linear."""
    transformer = build_tiny_wan_pipeline().transformer
    targets = [name for name, module in transformer.named_modules()
               if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in WAN.lora_target_modules)]
    assert len(targets) == 4 * 2 * transformer.config.num_layers
    assert all(re.fullmatch(r"blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)", name) for name in targets)


def test_specs_hold_the_real_models_limits():
    """Guards the specs against the diffusers docs' values: sizes, fps, frames (4k+1), 512 tokens, 50 steps,
    guidance 5; sizes are whole patches of the model's VAE (16 for Wan 2.1, 32 for Wan 2.2 5B)."""
    table = {spec.name: (spec.height, spec.width, spec.fps, spec.max_num_frames) for spec in
             (WAN21_T2V_1_3B, WAN21_T2V_14B, WAN22_TI2V_5B)}
    assert table == {"Wan-AI/Wan2.1-T2V-1.3B-Diffusers": (480, 832, 16, 81),
                     "Wan-AI/Wan2.1-T2V-14B-Diffusers": (720, 1280, 16, 81),
                     "Wan-AI/Wan2.2-TI2V-5B-Diffusers": (704, 1280, 24, 121)}
    for spec, spatial in ((WAN21_T2V_1_3B, 8), (WAN21_T2V_14B, 8), (WAN22_TI2V_5B, 16)):
        assert spec.frame_step == 4 and spec.max_sequence_length == 512 and spec.dtype == "bfloat16"
        assert (spec.default_num_inference_steps, spec.default_guidance_scale) == (50, 5.0)
        assert spec.height % size_multiple(spatial) == 0 and spec.width % size_multiple(spatial) == 0


def test_loaders_and_inferred_spec_from_a_folder(tmp_path):
    """Guards the loaders: the pipeline loads with a float32 VAE (diffusers' Wan recommendation) and the rest in
    the asked dtype; the training scheduler is flow-match with the folder's 1000 steps; a folder with no known
    name gets Wan 2.1 1.3B's limits under its own name; `inference_pipeline` rebuilds an equivalent pipeline."""
    folder = write_tiny_wan_model(tmp_path / "tiny-wan")
    pipeline = WAN.load_pipeline(folder, torch.bfloat16)
    assert pipeline.vae.dtype == torch.float32 and pipeline.transformer.dtype == torch.bfloat16
    scheduler = WAN.load_training_scheduler(folder)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.num_train_timesteps == 1000
    spec = WAN.infer_spec(folder, "my-wan")
    assert spec.name == "my-wan" and (spec.height, spec.width, spec.fps) == (480, 832, 16)
    assert WAN.infer_spec(folder, "Wan-AI/Wan2.2-TI2V-5B-Diffusers") == WAN22_TI2V_5B
    rebuilt = WAN.inference_pipeline(folder, tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder,
                                     vae=pipeline.vae, transformer=pipeline.transformer)
    assert isinstance(rebuilt, WanPipeline) and rebuilt.config.expand_timesteps is False
    # The folder's sampler, never the training scheduler's config (which made validation sample a flow model
    # as an epsilon-DDPM one: UniPC from a flow-match config has prediction_type epsilon, no flow sigmas).
    assert type(rebuilt.scheduler) is type(pipeline.scheduler)
    assert dict(rebuilt.scheduler.config) == dict(pipeline.scheduler.config)
    assert rebuilt.scheduler.config.prediction_type == "flow_prediction" and rebuilt.scheduler.config.use_flow_sigmas


def test_inference_pipeline_keeps_wan22_per_token_timesteps(tmp_path):
    """Guards Wan 2.2 TI2V-5B's `expand_timesteps` (a pipeline option in model_index.json) being guessed or
    dropped when validation rebuilds the pipeline from loaded components."""
    folder = write_tiny_wan_model(tmp_path / "tiny-wan-22", vae="2.2")
    pipeline = WAN.load_pipeline(folder, torch.float32)
    assert pipeline.config.expand_timesteps is True
    rebuilt = WAN.inference_pipeline(folder, tokenizer=None, text_encoder=None, vae=pipeline.vae,
                                     transformer=pipeline.transformer)
    assert rebuilt.config.expand_timesteps is True


def test_a_pipeline_class_no_family_claims_is_one_sentence_not_cogvideox(tmp_path):
    """Guards a Wan folder of a pipeline slapgen does not support (WanImageToVideoPipeline: Wan2.1-I2V, VACE)
    silently resolving as CogVideoX (480x720, 8 fps, 49 frames) and failing later in a traceback; and a
    slap_spec.json whose family is not the folder's (a Wan folder with a spec file written before `family`
    existed) being believed."""
    from slapgen.errors import ModelUnavailableError
    from slapgen.models.specs import SPEC_FILENAME, spec_for_folder

    folder = write_tiny_wan_model(tmp_path / "tiny-wan")
    assert spec_for_folder(folder, "tiny-wan").family == "wan"

    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(ModelUnavailableError, match=r"holds a WanImageToVideoPipeline, which slapgen does not "
                                                    r"support; supported pipelines: CogVideoXPipeline, WanPipeline"):
        spec_for_folder(folder, "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")

    (folder / "model_index.json").write_text(json.dumps(index))
    spec = json.loads((folder / SPEC_FILENAME).read_text())
    del spec["family"]  # read as the default family, cogvideox
    (folder / SPEC_FILENAME).write_text(json.dumps(spec))
    with pytest.raises(ModelUnavailableError, match=r"holds a WanPipeline \(wan\) but its spec says family 'cogvideox'"):
        spec_for_folder(folder, "tiny-wan")
