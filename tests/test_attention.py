"""The attention kernel (SLAP_ATTENTION): each kernel really runs CogVideoX's attention, kernels that
run on this CPU match PyTorch's default choice, and kernels that cannot run stop start-up with one
sentence before the model loads."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from slapgen.engine.attention import ReplaceSdpa, apply_attention
from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.errors import AttentionUnavailableError, SettingsError
from slapgen.models.cogvideox import kernel_attention_processor
from slapgen.models.loading import resolve_model

STEPS = 2
# SDPA's aten op per kernel on the CPU (what torch's profiler records).
CPU_KERNEL_OPS = {"math": "aten::_scaled_dot_product_attention_math",
                  "flash": "aten::_scaled_dot_product_flash_attention_for_cpu"}
ALL_SDPA_OPS = set(CPU_KERNEL_OPS.values())
# Frames are in [0, 1]. Kernels computing the same attention in fp32 differ only in summation order:
# each attention output moves by a few ulps times the number of keys (104 tokens on the tiny model,
# so < 1e-5 relative), and 2 blocks x 2 steps x classifier-free guidance and the VAE amplify that by
# well under 10 (measured: math vs default 5e-6 at most). A kernel that computes anything else (no
# softmax scale, heads mixed up, RoPE dropped) moves frames by about 0.1, what another seed does.
FRAME_ATOL = 1e-4


def _engine(tiny_cache_dir, tmp_path, model: str = "tiny", **options) -> VideoGenerator:
    return VideoGenerator.load(resolve_model(model, tiny_cache_dir),
                               EngineOptions(adapters_dir=tmp_path / "adapters", max_lora_rank=4, **options))


def _profiled_frames(generator: VideoGenerator, **changes) -> tuple[np.ndarray, dict[str, int]]:
    """Frames of a short generation and how often each SDPA kernel op ran in it."""
    params = GenerationParams.defaults_for(generator.spec, seed=4, num_inference_steps=STEPS, **changes)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        frames = generator.generate_frames(params)
    counts = {name: 0 for name in ALL_SDPA_OPS}
    for event in prof.events():
        if event.name in counts:
            counts[event.name] += 1
    return frames, counts


@pytest.fixture(scope="module")
def default_run(tiny_cache_dir, tmp_path_factory):
    return _profiled_frames(_engine(tiny_cache_dir, tmp_path_factory.mktemp("default")))


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_cpu_kernels_run_cogvideox_attention_and_match_default_sdpa(kernel, default_run, tiny_cache_dir, tmp_path):
    """Guards a kernel setting that never reaches CogVideoX's attention (diffusers' set_attention_backend is
    such a no-op for CogVideoX) or computes something else: every transformer attention call of the
    generation (blocks x steps, the CFG pair batched) must run the chosen kernel's aten op, and the frames
    must stay within FRAME_ATOL of PyTorch's default choice (see there for why that tolerance)."""
    generator = _engine(tiny_cache_dir, tmp_path, attention=kernel)
    frames, counts = _profiled_frames(generator)
    default_frames, default_counts = default_run
    blocks = generator.pipeline.transformer.config.num_layers
    # The default run shows which SDPA calls are the transformer's: on the CPU PyTorch picks flash for them.
    other = default_counts[CPU_KERNEL_OPS["flash"]] - blocks * STEPS
    assert default_counts[CPU_KERNEL_OPS["math"]] == 0 and other >= 0
    expected = {CPU_KERNEL_OPS[kernel]: blocks * STEPS}
    for name in ALL_SDPA_OPS:
        assert counts[name] == expected.get(name, 0) + (other if name == CPU_KERNEL_OPS["flash"] else 0), (name, counts)
    assert generator.info()["attention"] == kernel
    np.testing.assert_allclose(frames, default_frames, rtol=0, atol=FRAME_ATOL)


@pytest.fixture(scope="module")
def wan_default_run(tiny_wan_cache_dir, tmp_path_factory):
    return _profiled_frames(_engine(tiny_wan_cache_dir, tmp_path_factory.mktemp("wan-default"), "tiny-wan"), num_frames=5)


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_cpu_kernels_run_wan_attention_and_match_default_sdpa(kernel, wan_default_run, tiny_wan_cache_dir, tmp_path):
    """Guards a kernel setting that never reaches Wan's attention (the family's processor not installed, or
    one that bypasses the kernel context) or computes something else: every transformer attention call
    (blocks x 2 attentions, self and cross, x 2 calls a step, WanPipeline's conditional and unconditional
    passes, x steps) must run the chosen kernel's aten op, and the frames must stay within FRAME_ATOL of
    PyTorch's default choice (5 frames of tiny-wan)."""
    generator = _engine(tiny_wan_cache_dir, tmp_path, "tiny-wan", attention=kernel)
    frames, counts = _profiled_frames(generator, num_frames=5)
    default_frames, default_counts = wan_default_run
    calls = generator.pipeline.transformer.config.num_layers * 2 * 2 * STEPS
    other = default_counts[CPU_KERNEL_OPS["flash"]] - calls  # the text encoder's and the VAE's, untouched
    assert default_counts[CPU_KERNEL_OPS["math"]] == 0 and other >= 0
    expected = {CPU_KERNEL_OPS[kernel]: calls}
    for name in ALL_SDPA_OPS:
        assert counts[name] == expected.get(name, 0) + (other if name == CPU_KERNEL_OPS["flash"] else 0), (name, counts)
    assert (generator.info()["attention"], generator.info()["family"]) == (kernel, "wan")
    np.testing.assert_allclose(frames, default_frames, rtol=0, atol=FRAME_ATOL)


def test_a_replacement_kernel_receives_every_attention_call(tiny_cache_dir, tmp_path, default_run):
    """Guards the route SageAttention and FP8 attention take (SDPA calls handed to another function)
    missing CogVideoX's attention or passing the wrong layout: a stand-in kernel, the closed form
    softmax(q k^T / sqrt(d)) v written out here, must receive every transformer attention call as
    (batch, heads, tokens, head size) tensors, and the frames must match the default within FRAME_ATOL."""
    calls = []

    def closed_form(query, key, value):
        calls.append(query.shape)
        weights = torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1]), dim=-1)
        return weights @ value

    generator = _engine(tiny_cache_dir, tmp_path)
    transformer = generator.pipeline.transformer
    transformer.set_attn_processor(kernel_attention_processor(lambda: ReplaceSdpa(closed_form)))
    frames = generator.generate_frames(GenerationParams.defaults_for(generator.spec, seed=4, num_inference_steps=STEPS))
    config = transformer.config
    tokens = config.max_text_seq_length + 3 * 4 * 6  # text + 3 latent frames of 4 x 6 patches (9 x 64 x 96)
    assert calls == [(2, config.num_attention_heads, tokens, config.attention_head_dim)] * (config.num_layers * STEPS)
    np.testing.assert_allclose(frames, default_run[0], rtol=0, atol=FRAME_ATOL)


def test_default_sdpa_leaves_diffusers_processor_untouched(tiny_cache_dir, tmp_path):
    """Guards `sdpa` (the default) changing anything: the stock processors stay and no module is counted."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    generator = _engine(tiny_cache_dir, tmp_path)
    assert apply_attention(generator.pipeline.transformer, "sdpa", "cpu") == 0
    processors = generator.pipeline.transformer.attn_processors.values()
    assert {type(p) for p in processors} == {CogVideoXAttnProcessor2_0}


UNRUNNABLE_ON_CPU = {
    "efficient": "torch has no such kernel there",
    "cudnn": "torch has no such kernel there",
    "fa3": "Hopper GPU",
    "fp8": "Hopper GPU",
    "sage": "sageattention package is not installed",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals")
@pytest.mark.parametrize("kernel", sorted(UNRUNNABLE_ON_CPU))
def test_a_kernel_that_cannot_run_stops_start_up_with_one_sentence(kernel, tiny_cache_dir, tmp_path, monkeypatch):
    """Guards an impossible kernel crashing mid-load or at the first request: start-up (settings, then
    the engine) raises AttentionUnavailableError, one line naming SLAP_ATTENTION=kernel and why, before
    the pipeline is loaded."""
    if kernel == "sage" and importlib.util.find_spec("sageattention") is not None:
        pytest.skip("sageattention is installed here")
    from slapgen.engine import generator as generator_module
    from slapgen.serving.settings import SlapSettings

    with pytest.raises(AttentionUnavailableError) as from_settings:
        SlapSettings(model="tiny", device="cpu", quant="none", attention=kernel).engine_options()
    loads = []
    monkeypatch.setattr(generator_module, "load_pipeline", lambda *a: loads.append(a))
    with pytest.raises(AttentionUnavailableError) as from_engine:
        _engine(tiny_cache_dir, tmp_path, attention=kernel)
    assert loads == []
    for error in (from_settings.value, from_engine.value):
        message = str(error)
        assert message.startswith(f"SLAP_ATTENTION={kernel} cannot run here: ") and "\n" not in message
        assert UNRUNNABLE_ON_CPU[kernel] in message and message.endswith("SLAP_ATTENTION=sdpa, which lets PyTorch pick a kernel that runs.")


def test_an_unknown_kernel_name_is_a_settings_error(monkeypatch):
    from slapgen.serving.settings import load_settings

    monkeypatch.setenv("SLAP_ATTENTION", "xformers")
    with pytest.raises(SettingsError, match="SLAP_ATTENTION"):
        load_settings()


@pytest.mark.gpu
def test_every_kernel_that_runs_on_this_gpu_matches_default_sdpa():
    """Guards a kernel computing something other than attention on the GPU: on a bf16 transformer with
    5B's head size (64), each kernel that passes the start-up check gives the transformer output of
    PyTorch's default choice within bf16 rounding (exact kernels: 3e-2 of the output's scale) or, for the
    quantised ones (fp8, sage), a signal-to-quantisation-noise ratio of at least 20 dB (torchao's own test
    bound for FP8 attention). Kernels that cannot run here must say so in one sentence."""
    from diffusers import CogVideoXTransformer3DModel

    from slapgen.models.cogvideox import rotary_embeddings

    torch.manual_seed(0)
    config = dict(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4, text_embed_dim=64,
                  time_embed_dim=64, num_layers=2, sample_height=60, sample_width=90, sample_frames=49,
                  use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False, max_text_seq_length=32)
    reference = CogVideoXTransformer3DModel(**config).to("cuda", torch.bfloat16).eval()
    inputs = dict(hidden_states=torch.randn(2, 3, 4, 16, 24, device="cuda", dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16),
                  timestep=torch.tensor([500, 500], device="cuda"),
                  image_rotary_emb=rotary_embeddings(reference.config, 128, 192, 3, "cuda"), return_dict=False)
    with torch.inference_mode():
        expected = reference(**inputs)[0].float()
    refused = {}
    for kernel in ["flash", "efficient", "cudnn", "math", "sage", "fa3", "fp8"]:  # FA3 switches torch's flash: last
        transformer = CogVideoXTransformer3DModel(**config).to("cuda", torch.bfloat16).eval()
        transformer.load_state_dict(reference.state_dict())
        try:
            apply_attention(transformer, kernel, "cuda")
        except AttentionUnavailableError as error:
            refused[kernel] = str(error)
            assert "\n" not in str(error) and str(error).startswith(f"SLAP_ATTENTION={kernel} cannot run here")
            continue
        with torch.inference_mode():
            output = transformer(**inputs)[0].float()
        if kernel in ("fp8", "sage"):
            sqnr = 10 * torch.log10(expected.pow(2).mean() / (output - expected).pow(2).mean())
            assert sqnr >= 20, (kernel, sqnr)
        else:
            assert (output - expected).abs().max() <= 3e-2 * expected.abs().max(), kernel
    if "FA3" in getattr(torch.nn.attention, "list_flash_attention_impls", lambda: [])():
        torch.nn.attention.restore_flash_attention_impl(_raise_warn=False)
    print("refused:", refused)
