"""Step caching (SLAP_CACHE): each cache hooks the modules it should, does the work its documented rule
says (counted in the transformer's linear layers), equals plain diffusers with the same hook, stays near
the uncached output, and keeps nothing from one request for the next."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slapgen.engine.caching import CacheSetting, hooked_modules
from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.errors import RequestError, SettingsError
from slapgen.models.loading import resolve_model

STEPS = 6  # timesteps 999, 832, 666, 499, 332, 166: every cache's rule takes both branches
SEED = 11


def _engine(tiny_cache_dir, tmp_path, cache: str = "none", model: str = "tiny", **options) -> VideoGenerator:
    return VideoGenerator.load(resolve_model(model, tiny_cache_dir),
                               EngineOptions(adapters_dir=tmp_path / "adapters", max_lora_rank=4,
                                             cache=CacheSetting.parse(cache), **options))


def _params(generator, **changes) -> GenerationParams:
    return GenerationParams.defaults_for(generator.spec, seed=SEED, num_inference_steps=STEPS).replace(**changes)


class WorkCounter:
    """Rows (batch entries) through each block's attention (its query projection) and feed-forward (its
    output projection) per transformer call: the work a cache saves, whether it skips a module, a block or
    half of the classifier-free-guidance batch."""

    def __init__(self, transformer):
        self.attention: list[int] = []
        self.feed_forward: list[int] = []
        for block in transformer.transformer_blocks:
            block.attn1.to_q.register_forward_hook(lambda m, args, out: self.attention.append(args[0].shape[0]))
            block.ff.net[2].register_forward_hook(lambda m, args, out: self.feed_forward.append(args[0].shape[0]))


def _timesteps(pipeline, steps: int) -> list[int]:
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


# The documented rules of diffusers 0.42.1's hooks with slapgen's settings, written out: rows each block's
# attention and feed-forward process at denoising step i (timestep t), classifier-free guidance batching 2.
def pab_rows(i: int, t: int) -> tuple[int, int]:
    """PAB, block skip range 2, timestep range (100, 800): attention reused on odd steps inside the range."""
    reuse = 100 < t < 800 and i % 2 == 1
    return (0 if reuse else 2), 2


def fastercache_rows(i: int, t: int) -> tuple[int, int]:
    """FasterCache (diffusers' CogVideoX example): the unconditional half is skipped when i > 0, t < 641 and
    i % 5 != 0; attention is reused below t 681 on odd steps, but only when that half is skipped too."""
    batch = 1 if (i > 0 and -1 < t < 641 and i % 5 != 0) else 2
    reuse = -1 < t < 681 and not (i > 0 and i % 2 == 0) and batch == 1
    return (0 if reuse else batch), batch


def taylorseer_rows(i: int, t: int) -> tuple[int, int]:
    """TaylorSeer (interval 5, first 3 steps computed): attention and feed-forward computed when i < 3 or
    (i - 4) % 5 == 0, extrapolated otherwise."""
    compute = i < 3 or (i - 3 - 1) % 5 == 0
    return (2, 2) if compute else (0, 0)


RULES = {"pab": pab_rows, "fastercache": fastercache_rows, "taylorseer": taylorseer_rows}


def reference_config(kind: str, pipeline):
    """The same cache on a plain diffusers pipeline, configured as diffusers documents it."""
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    if kind == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(100, 800),
                                               current_timestep_callback=lambda: pipeline.current_timestep)
    if kind == "fastercache":
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                                 low_frequency_weight_update_timestep_range=(99, 641),
                                 high_frequency_weight_update_timestep_range=(-1, 301),
                                 spatial_attention_block_identifiers=["transformer_blocks"],
                                 attention_weight_callback=lambda _: 0.3, tensor_format="BFCHW",
                                 current_timestep_callback=lambda: pipeline.current_timestep)
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(cache_identifiers=[r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"],
                                     taylor_factors_dtype=torch.float32)
    return FirstBlockCacheConfig(threshold=float(kind.partition(":")[2]))


def _plain_diffusers(tiny_cache_dir, kind: str | None, params: GenerationParams) -> tuple[np.ndarray, WorkCounter]:
    from diffusers import CogVideoXPipeline

    pipeline = CogVideoXPipeline.from_pretrained(resolve_model("tiny", tiny_cache_dir).folder, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    if kind is not None:
        pipeline.transformer.enable_cache(reference_config(kind, pipeline))
    counter = WorkCounter(pipeline.transformer)
    frames = pipeline(**params.pipeline_arguments(), generator=torch.Generator("cpu").manual_seed(params.seed),
                      output_type="np").frames[0]
    return frames, counter


@pytest.fixture(scope="module")
def uncached(tiny_cache_dir, tmp_path_factory):
    """Frames without a cache for seeds SEED and SEED + 1, and the rows of the SEED generation."""
    generator = _engine(tiny_cache_dir, tmp_path_factory.mktemp("uncached"))
    counter = WorkCounter(generator.pipeline.transformer)
    frames = generator.generate_frames(_params(generator))
    rows = (list(counter.attention), list(counter.feed_forward))
    other_seed = generator.generate_frames(_params(generator, seed=SEED + 1))
    return frames, other_seed, rows


def test_cache_settings_parse_and_bad_ones_name_the_variable(monkeypatch):
    """Guards values that would start a service with a cache nobody asked for (or none): every accepted
    spelling round-trips, and every other one is a SettingsError naming SLAP_CACHE."""
    from slapgen.serving.settings import load_settings

    for text in ["none", "pab", "fastercache", "taylorseer", "fbc:0.05", "fbc:1"]:
        assert str(CacheSetting.parse(text)) == text
    assert CacheSetting.parse("fbc:0.25") == CacheSetting("fbc", 0.25)
    for bad in ["fbc", "fbc:", "fbc:0", "fbc:1.5", "fbc:nan", "fbc:x", "pab:2", "teacache", "magcache", ""]:
        with pytest.raises(ValueError):
            CacheSetting.parse(bad)
        monkeypatch.setenv("SLAP_CACHE", bad)
        with pytest.raises(SettingsError, match="SLAP_CACHE") as error:
            load_settings()
        assert "\n" not in str(error.value)
    monkeypatch.setenv("SLAP_CACHE", "fbc:0.1")
    assert load_settings().engine_options().cache == CacheSetting("fbc", 0.1)


def test_each_cache_hooks_the_modules_it_needs(tiny_cache_dir, tmp_path):
    """Guards a cache that silently hooks nothing: diffusers' default TaylorSeer patterns (`^transformer_blocks.*attn`,
    matched whole) do not match CogVideoX's `transformer_blocks.N.attn1`, so TaylorSeer with defaults is a
    no-op; slapgen's patterns hook each block's attention and feed-forward. The counts are what each cache's
    rule needs: one attention per block (PAB, FasterCache), every block (FBC), attention + feed-forward (TaylorSeer)."""
    from diffusers import TaylorSeerCacheConfig

    from slapgen.models.tiny import build_tiny_pipeline

    defaults = build_tiny_pipeline().transformer
    defaults.enable_cache(TaylorSeerCacheConfig())
    assert hooked_modules(defaults) == []

    blocks = 2
    expected = {
        "pab": [f"transformer_blocks.{i}.attn1" for i in range(blocks)],
        "fastercache": [f"transformer_blocks.{i}.attn1" for i in range(blocks)],
        "fbc:0.05": [f"transformer_blocks.{i}" for i in range(blocks)],
        "taylorseer": [f"transformer_blocks.{i}.{m}" for i in range(blocks) for m in ("attn1", "ff")],
        "none": [],
    }
    for cache, names in expected.items():
        generator = _engine(tiny_cache_dir, tmp_path, cache)
        assert generator.pipeline.transformer.config.num_layers == blocks
        assert hooked_modules(generator.pipeline.transformer) == names, cache
        assert (generator.info()["cache"], generator.info()["cache_hooked_modules"]) == (cache, len(names))


@pytest.mark.parametrize("kind", ["pab", "fastercache", "taylorseer"])
def test_each_cache_does_the_work_its_rule_says_and_matches_plain_diffusers(kind, tiny_cache_dir, tmp_path, uncached):
    """Guards a cache that is not applied, applied with other settings, or wired to the wrong timestep:
    the rows each block's attention and feed-forward process must follow the cache's documented rule
    (written out above) step by step, which is less work than without the cache; the frames must equal
    plain diffusers with the same hook configured as diffusers documents it (bit for bit); and the
    frames must stay within a fifth of what changing the seed does. That bound: a cache reuses or
    extrapolates activations of the same generation, so the video must stay the same video; a different
    seed is the scale of a different video (about 0.17 mean absolute on these frames), and the caches
    measure 0.006 to 0.014 here, so a fifth leaves over twice that as margin while a cache that mixed in
    another generation's or the other guidance half's activations would not stay inside it."""
    none_frames, other_seed, (none_attention, none_feed_forward) = uncached
    generator = _engine(tiny_cache_dir, tmp_path, kind)
    counter = WorkCounter(generator.pipeline.transformer)
    params = _params(generator)
    frames = generator.generate_frames(params)

    blocks = generator.pipeline.transformer.config.num_layers
    per_step = [RULES[kind](i, t) for i, t in enumerate(_timesteps(generator.pipeline, STEPS))]
    assert counter.attention == [a for a, _ in per_step for _ in range(blocks) if a]
    assert counter.feed_forward == [f for _, f in per_step for _ in range(blocks) if f]
    assert none_attention == [2] * (blocks * STEPS) and none_feed_forward == [2] * (blocks * STEPS)
    assert sum(counter.attention) + sum(counter.feed_forward) < sum(none_attention) + sum(none_feed_forward)

    expected, reference_counter = _plain_diffusers(tiny_cache_dir, kind, params)
    assert np.array_equal(frames, expected)
    assert (reference_counter.attention, reference_counter.feed_forward) == (counter.attention, counter.feed_forward)
    seed_scale = np.abs(none_frames - other_seed).mean()
    assert 0 < np.abs(frames - none_frames).mean() < seed_scale / 5


def test_first_block_cache_skips_blocks_as_diffusers_does(tiny_cache_dir, tmp_path, uncached):
    """Guards FBC's threshold not reaching diffusers, and a threshold that skips nothing being anything but
    the uncached model: at 1.0 (the first block's output changes by 30-100% between steps of the tiny random
    model) the other blocks are skipped on some steps exactly as plain diffusers' FBC at 1.0 skips them, with
    the same frames, less work and frames within the bound of the test above; at 1e-6 every block runs and
    the frames are bit-identical to no cache."""
    none_frames, other_seed, (none_attention, _) = uncached
    generator = _engine(tiny_cache_dir, tmp_path, "fbc:1")
    counter = WorkCounter(generator.pipeline.transformer)
    params = _params(generator)
    frames = generator.generate_frames(params)
    expected, reference_counter = _plain_diffusers(tiny_cache_dir, "fbc:1", params)
    assert np.array_equal(frames, expected) and reference_counter.attention == counter.attention
    assert STEPS * 2 <= sum(counter.attention) < sum(none_attention)  # the first block always runs
    assert np.abs(frames - none_frames).mean() < np.abs(none_frames - other_seed).mean() / 5

    everything = _engine(tiny_cache_dir, tmp_path, "fbc:0.000001")
    assert np.array_equal(everything.generate_frames(params), none_frames)


def test_no_cache_is_bit_identical_to_plain_diffusers(tiny_cache_dir, uncached):
    """Guards `none` (the default) leaving a hook, a processor or state behind: the engine's frames equal
    plain diffusers' without any hook, bit for bit, and it does the full work."""
    params = GenerationParams.defaults_for(resolve_model("tiny", tiny_cache_dir).spec, seed=SEED, num_inference_steps=STEPS)
    expected, counter = _plain_diffusers(tiny_cache_dir, None, params)
    assert np.array_equal(uncached[0], expected)
    assert counter.attention == uncached[2][0]


class StopHere(Exception):
    pass


@pytest.mark.parametrize("kind", ["pab", "fastercache", "fbc:1", "taylorseer"])
def test_cache_state_never_reaches_the_next_request(kind, tiny_cache_dir, tmp_path):
    """Guards hook state leaking between requests: diffusers resets it only after a generation that finished,
    so a request that failed half-way left its step counters and cached activations to the next one. The
    same request on a fresh engine, after another request (other prompt, seed and step count), and after a
    request that failed after one step must give bit-identical frames."""
    generator = _engine(tiny_cache_dir, tmp_path, kind)
    params = _params(generator, num_inference_steps=4)
    fresh = generator.generate_frames(params)
    other = params.replace(prompt="the referee waves off the bout", seed=3, num_inference_steps=5)
    generator.generate_frames(other)
    after_other = generator.generate_frames(params)

    def fail_after_first_step(done, total):
        raise StopHere

    with pytest.raises(StopHere):
        generator.generate_frames(other, on_step=fail_after_first_step)
    after_failure = generator.generate_frames(params)
    assert np.array_equal(fresh, after_other) and np.array_equal(fresh, after_failure)


def test_fastercache_refuses_requests_without_guidance(tiny_cache_dir, tmp_path):
    """Guards FasterCache crashing mid-generation (it splits the batch into unguided and guided halves):
    a request with guidance_scale <= 1 is a RequestError naming guidance_scale, before it queues."""
    generator = _engine(tiny_cache_dir, tmp_path, "fastercache")
    with pytest.raises(RequestError, match="guidance_scale must be above 1 with SLAP_CACHE=fastercache") as error:
        generator.generate_frames(_params(generator, guidance_scale=1.0))
    assert error.value.field == "guidance_scale" and generator.queue_length == 0
    plain = _engine(tiny_cache_dir, tmp_path, "pab")
    assert np.isfinite(plain.generate_frames(_params(plain, guidance_scale=1.0, num_inference_steps=2))).all()


@pytest.mark.slow
@pytest.mark.parametrize("attention, cache", [("math", "pab"), ("flash", "fastercache")])
def test_kernel_and_cache_under_compile_never_recompile_across_swaps(attention, cache, adapter_files, tiny_cache_dir,
                                                                     tmp_path):
    """Guards an attention kernel or cache hook that makes the compiled transformer compile again after
    warm-up (dynamo guarding on a hook's step counter, a kernel context that breaks the graph each call):
    base -> a -> b -> a -> base on the compiled engine with dynamo told to fail on any recompilation gives
    0 recompilations, swaps that take effect, swapping back restores exactly, and the compiled frames
    match the same engine run eagerly within inductor's fp32 reordering (1e-4 on frames in [0, 1])."""
    import shutil

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name in ("a", "b"):
        shutil.copy(adapter_files[name], adapters / f"{name}.safetensors")
    options = dict(attention=attention, cache=CacheSetting.parse(cache), adapters_dir=adapters, max_lora_rank=8)
    resolved = resolve_model("tiny", tiny_cache_dir)
    compiled = VideoGenerator.load(resolved, EngineOptions(compile=True, **options))
    base = GenerationParams.defaults_for(compiled.spec, seed=3)  # the default step count, as the warm-up ran
    frames = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for label, adapter in [("base", None), ("a", "a"), ("b", "b"), ("a again", "a"), ("base again", None)]:
            frames[label] = compiled.generate_frames(base.replace(adapter=adapter))
    info = compiled.info()
    assert info["recompilations"] == 0 and compiled.slot.swaps == 3
    assert (info["attention"], info["cache"]) == (attention, cache)
    assert np.array_equal(frames["base"], frames["base again"]) and np.array_equal(frames["a"], frames["a again"])
    assert not np.array_equal(frames["a"], frames["b"]) and not np.array_equal(frames["base"], frames["a"])
    eager = VideoGenerator.load(resolved, EngineOptions(**options))
    for label, adapter in [("base", None), ("b", "b")]:
        np.testing.assert_allclose(frames[label], eager.generate_frames(base.replace(adapter=adapter)), rtol=0, atol=1e-4)


# --- Wan (tiny-wan): the caches its family supports match plain diffusers' hook; the others are refused. -----
# WanPipeline runs classifier-free guidance as two batch-1 transformer calls a step (conditional, then
# unconditional), so work is counted in calls, not rows. 5 frames: tiny-wan's VAE is slow on a CPU.
WAN_CACHES = ["pab", "fbc:1", "taylorseer"]


def wan_reference_config(kind: str, pipeline):
    """The same cache on a plain WanPipeline, with Wan's module names written out here."""
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    if kind == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(100, 800),
                                               spatial_attention_block_identifiers=[r"blocks\.\d+\.attn1"],
                                               current_timestep_callback=lambda: pipeline.current_timestep)
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(cache_identifiers=[r"blocks\.\d+\.attn1", r"blocks\.\d+\.ffn"],
                                     taylor_factors_dtype=torch.float32)
    return FirstBlockCacheConfig(threshold=float(kind.partition(":")[2]))


def _wan_calls(transformer) -> list[int]:
    """Calls of each block's self-attention (its query projection), appended as block indices."""
    calls: list[int] = []
    for index, block in enumerate(transformer.blocks):
        block.attn1.to_q.register_forward_hook(lambda m, args, out, index=index: calls.append(index))
    return calls


@pytest.fixture(scope="module")
def wan_uncached(tiny_wan_cache_dir, tmp_path_factory):
    """tiny-wan's frames and self-attention calls without a cache."""
    generator = VideoGenerator.load(resolve_model("tiny-wan", tiny_wan_cache_dir),
                                    EngineOptions(adapters_dir=tmp_path_factory.mktemp("wan") / "adapters",
                                                  max_lora_rank=4))
    calls = _wan_calls(generator.pipeline.transformer)
    frames = generator.generate_frames(_params(generator, num_frames=5))
    return frames, calls


@pytest.mark.parametrize("kind", WAN_CACHES)
def test_each_cache_wan_supports_matches_plain_diffusers_on_wan(kind, tiny_wan_cache_dir, tmp_path, wan_uncached):
    """Guards the step caches on Wan: First Block Cache looked for CogVideoX's `transformer_blocks` (an
    AttributeError on Wan's `blocks`), and TaylorSeer's default patterns hook nothing in Wan. Each cache Wan
    supports must hook Wan's modules (the family's patterns), do less self-attention work than no cache, and
    give frames and per-block calls equal to a plain WanPipeline with the same hook, Wan's module names
    written out here (bit for bit)."""
    none_frames, none_calls = wan_uncached
    generator = _engine(tiny_wan_cache_dir, tmp_path, kind, model="tiny-wan")
    assert generator.info()["cache_hooked_modules"] > 0 and generator.info()["family"] == "wan"
    calls = _wan_calls(generator.pipeline.transformer)
    params = _params(generator, num_frames=5)
    frames = generator.generate_frames(params)

    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(resolve_model("tiny-wan", tiny_wan_cache_dir).folder, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.transformer.enable_cache(wan_reference_config(kind, pipeline))
    reference_calls = _wan_calls(pipeline.transformer)
    expected = pipeline(**params.pipeline_arguments(), generator=torch.Generator("cpu").manual_seed(params.seed),
                        output_type="np").frames[0]
    assert np.array_equal(frames, expected) and calls == reference_calls
    blocks = generator.pipeline.transformer.config.num_layers
    assert len(none_calls) == blocks * 2 * STEPS and len(calls) < len(none_calls)
    assert not np.array_equal(frames, none_frames)


def test_a_cache_wan_does_not_support_stops_start_up_with_one_sentence(tiny_wan_cache_dir, tmp_path, monkeypatch):
    """Guards FasterCache on Wan failing mid-request (diffusers 0.42.1's FasterCache raises IndexError on
    WanPipeline's separate conditional and unconditional calls): the engine refuses it at start-up, before
    the pipeline loads, with one sentence naming SLAP_CACHE, why, and the caches that do work."""
    from slapgen.engine import generator as generator_module
    from slapgen.errors import CacheUnavailableError

    loads = []
    monkeypatch.setattr(generator_module, "load_pipeline", lambda *a: loads.append(a))
    with pytest.raises(CacheUnavailableError) as error:
        _engine(tiny_wan_cache_dir, tmp_path, "fastercache", model="tiny-wan")
    message = str(error.value)
    assert loads == [] and "\n" not in message
    assert message.startswith("SLAP_CACHE=fastercache does not work on wan models: ")
    assert "two calls" in message and message.endswith("use SLAP_CACHE=none, pab, fbc:THRESHOLD or taylorseer.")
