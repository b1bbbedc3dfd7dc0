"""Every preset we ship trains on the tiny model with its own precision, optimizer, schedule, LoRA and
logging (only the model, sizes and step counts change), and its LoRA serves with default settings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.models.loading import resolve_model
from tests.conftest import preset_overrides
from trainer.config import PRESETS_DIR, load_config
from trainer.lora import read_lora_metadata

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


# Each preset on each family's tiny twin; on tiny-wan the research presets' Wan values (their `families:
# {wan: ...}` block). On tiny-wan, TIC-FT's serving reference is not written out here (its Wan training:
# test_ticft's Wan test) and tiny-smoke trains and serves in test_training and test_preset_families already.
CASES = [(preset, "tiny") for preset in PRESETS] + [(preset, "tiny-wan") for preset in ("aggressive", "conservative")]


@pytest.mark.parametrize("preset, model", CASES)
def test_preset_trains_and_its_lora_serves_with_default_settings(preset, model, demo_dataset, tiny_cache_dir, tmp_path,
                                                                 monkeypatch, request):
    """Guards presets that cannot train (a second Accelerator with the preset's bf16 raised
    `AcceleratorState has already been initialized`; nothing caught it because every training test
    used tiny-smoke) and preset LoRAs the service refuses by default (aggressive's rank 256 against a
    fixed rank-128 slot); on tiny-wan, a preset's Wan values that cannot train or serve, and a served Wan
    LoRA whose frames differ from plain WanPipeline's with it loaded."""
    import trainer.train as train_module
    from diffusers import CogVideoXPipeline, WanPipeline

    wan = model == "tiny-wan"
    if wan:
        request.getfixturevalue("tiny_wan_cache_dir")
    original = load_config(preset, [f"model={model}"] if wan else [])
    # A TIC-FT preset's clip length is its layout's: the tiny run uses c1b1t1, 9 frames like the others.
    config = load_config(preset, preset_overrides(tiny_cache_dir, *(["ticft.layout=c1b1t1"] if original.ticft else []),
                                                  *([f"model={model}", "data.num_frames=5", "data.max_clips=2"] if wan else [])))
    assert config.lora == original.lora and config.logging == original.logging
    assert config.optim.model_copy(update={"lr_warmup_steps": original.optim.lr_warmup_steps}) == original.optim
    assert config.train.mixed_precision == original.train.mixed_precision

    dtypes = []
    real_step = train_module.training_step
    monkeypatch.setattr(train_module, "training_step",
                        lambda *args, **kwargs: dtypes.append(args[-1]) or real_step(*args, **kwargs))
    run = tmp_path / "run"
    adapter = train_module.train(config, demo_dataset, run, progress=False)

    expected_dtype = DTYPES[original.train.mixed_precision if original.train.mixed_precision != "auto" else "no"]
    assert set(dtypes) == {expected_dtype}  # trained in the preset's precision
    steps = config.train.max_train_steps
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(config.logging.every_steps, steps + 1, config.logging.every_steps)) + (
        [] if steps % config.logging.every_steps == 0 else [steps])
    assert all(np.isfinite(row["loss"]) for row in logged)
    assert (run / "logs").is_dir() == config.logging.tensorboard
    if config.validation.prompts:
        assert (run / "validation" / "step-000002" / "prompt-00.mp4").stat().st_size > 0
    metadata = read_lora_metadata(adapter)
    assert (int(metadata["slapgen.rank"]), float(metadata["slapgen.alpha"])) == (original.lora.rank, original.lora.alpha)
    assert metadata.get("slapgen.ticft_layout") == (config.ticft.layout if config.ticft else None)

    # Serve it with the engine's default options (slot sized from the adapters present).
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    shutil.copy(adapter, adapters / "trained.safetensors")
    resolved = resolve_model(model, tiny_cache_dir)
    generator = VideoGenerator.load(resolved, EngineOptions(adapters_dir=adapters))
    assert generator.slot.max_rank >= original.lora.rank
    params = GenerationParams.defaults_for(generator.spec, seed=1, num_inference_steps=2, adapter="trained")
    if config.ticft:  # image-to-video: served from a condition image, against TIC-FT written out with diffusers
        from tests.test_ticft import reference_ticft_frames

        image = (np.random.default_rng(2).random((generator.spec.height, generator.spec.width, 3)) * 255).astype(np.uint8)
        params = params.replace(condition_image=image)
        expected = reference_ticft_frames(resolved.folder, adapter, params, config.ticft.parsed_layout)
        np.testing.assert_allclose(generator.generate_frames(params), expected, rtol=0, atol=1e-3)
        return
    served = generator.generate_frames(params)
    reference = (WanPipeline if wan else CogVideoXPipeline).from_pretrained(resolved.folder, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="trained")
    expected = reference(**params.pipeline_arguments(), generator=torch.Generator("cpu").manual_seed(1),
                         output_type="np").frames[0]
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-3)
