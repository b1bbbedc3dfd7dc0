"""A preset's model-specific values follow the family of the run's model (issue 22): the preset's
`families:` block of that family is merged over it, `--set` always wins, CogVideoX runs resolve exactly
as before, and the frame rule checked is the model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slapgen.models.specs import ModelSpec
from trainer.config import FAMILIES_KEY, PRESETS_DIR, TrainConfig, family_names, load_config, model_family
from trainer.errors import TrainConfigError

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _write_wan_folder(folder: Path, **spec) -> Path:
    """A Wan pipeline folder as far as config resolution reads it (model_index.json, slap_spec.json):
    no weights, so the test shows the family is known without them. Wan 2.1 T2V 1.3B's limits."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    values = dict(name="wan-1.3b-like", family="wan", dtype="bfloat16", height=480, width=832, fps=16,
                  max_num_frames=81, frame_step=4, spatial_compression=8, temporal_compression=4, patch_size=2,
                  default_num_frames=81, max_sequence_length=512, default_num_inference_steps=50,
                  default_guidance_scale=5.0)
    ModelSpec(**(values | spec)).save(folder)
    return folder


@pytest.fixture
def wan_model(tmp_path) -> str:
    return str(_write_wan_folder(tmp_path / "wan"))


@pytest.fixture
def tiny_wan_like_model(tmp_path) -> str:
    """tiny-wan's spec (slapgen.models.tiny_wan.TINY_WAN_SPEC on h-wan) until `tiny-wan` resolves by name."""
    return str(_write_wan_folder(tmp_path / "tiny-wan", name="tiny-wan", dtype="float32", height=64, width=96,
                                 default_num_frames=9, max_sequence_length=32, default_num_inference_steps=4))


def _preset_tree(preset: str) -> dict:
    return yaml.safe_load((PRESETS_DIR / f"{preset}.yaml").read_text())


def _settings(config: TrainConfig) -> dict[str, object]:
    """Every leaf setting of a resolved config by dotted name, except `model` (the test chooses it)."""
    flat = {}
    for section, values in config.model_dump(mode="json").items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        elif section != "model":
            flat[section] = values
    return flat


def _block_settings(block: dict, prefix: str = "") -> dict[str, object]:
    return {name: value for key, item in block.items()
            for name, value in (_block_settings(item, f"{prefix}{key}.") if isinstance(item, dict)
                                else {f"{prefix}{key}": item}).items()}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model", ["THUDM/CogVideoX-5b", "tiny"])
def test_a_cogvideox_model_resolves_the_preset_as_before(preset, model):
    """Guards the CogVideoX behaviour: its runs get the preset's own values, exactly what they were
    before family blocks existed (the preset read without its `families:` block)."""
    tree = {key: value for key, value in _preset_tree(preset).items() if key != FAMILIES_KEY}
    assert load_config(preset, [f"model={model}"]) == TrainConfig.model_validate(tree | {"model": model})


def test_conservative_on_wan_gets_the_wan_values(wan_model):
    """Guards presets hardcoding CogVideoX's values for every model (49 x 480 x 720 at 8 fps, CogVideoX's
    learning rate and rank on a Wan run): the Wan block's values, written out here from
    conservative.yaml's sources, replace them; everything else stays the preset's."""
    wan = load_config("conservative", [f"model={wan_model}"])
    cogvideox = load_config("conservative")
    assert (wan.data.height, wan.data.width, wan.data.num_frames, wan.data.fps) == (480, 832, 81, 16)
    assert (wan.lora.rank, wan.lora.alpha, wan.optim.learning_rate) == (32, 32, 1e-4)
    assert (wan.train.max_train_steps, wan.validation.guidance_scale) == (2000, 5.0)
    assert wan.data.max_clips == cogvideox.data.max_clips == 100
    assert wan.optim.model_copy(update={"learning_rate": 1e-3}) == cogvideox.optim
    assert wan.checkpoint == cogvideox.checkpoint and wan.logging == cogvideox.logging


@pytest.mark.parametrize("preset", PRESETS)
def test_every_wan_block_setting_and_only_those_change(preset, wan_model):
    """Guards a block that is not applied (or applied to the wrong settings): on a Wan model each setting
    the preset's Wan block names has the block's value (`native`: the model's spec's), every other one the
    CogVideoX resolution's."""
    config = load_config(preset, [f"model={wan_model}"])
    spec = config.model_spec
    native = {"data.fps": spec.fps, "data.height": spec.height, "data.width": spec.width,
              "data.num_frames": spec.default_num_frames}
    block = {name: native[name] if value == "native" else value
             for name, value in _block_settings(_preset_tree(preset)[FAMILIES_KEY]["wan"]).items()}
    wan = _settings(config)
    cogvideox = _settings(load_config(preset))
    assert {name: wan[name] for name in block} == block
    assert {name: value for name, value in wan.items() if name not in block} == \
        {name: value for name, value in cogvideox.items() if name not in block}


def test_set_beats_the_family_block(wan_model):
    """Guards the block being merged after `--set` (or a `--set` placed before `--set model=...` being
    lost): the user's values win wherever they stand on the command line."""
    config = load_config("conservative", ["lora.rank=8", f"model={wan_model}", "data.fps=24"])
    assert (config.lora.rank, config.data.fps) == (8, 24)
    assert (config.lora.alpha, config.data.width) == (32, 832)  # the rest of the block still applies


def test_the_model_set_last_picks_the_block(wan_model):
    """Guards reading the family from the preset's `model` instead of the run's (the last `--set model=`)."""
    assert load_config("conservative", ["model=tiny", f"model={wan_model}"]).data.fps == 16
    assert load_config("conservative", [f"model={wan_model}", "model=tiny"]).data.fps == 8


def test_tiny_smoke_on_tiny_wan_is_tiny_wans_size_and_a_valid_frame_count(tiny_wan_like_model):
    """Guards `slapgen train --config tiny-smoke --set model=tiny-wan` running at a size or length
    tiny-wan cannot take: its spec's 64 x 96, 9 frames (4k+1), its 16 fps."""
    config = load_config("tiny-smoke", [f"model={tiny_wan_like_model}"])
    spec = config.model_spec
    assert spec.family == "wan"
    assert (config.data.height, config.data.width, config.data.fps) == (spec.height, spec.width, spec.fps)
    assert (config.data.num_frames - 1) % 4 == 0 and config.data.num_frames <= spec.max_num_frames


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_every_preset_resolves_and_validates_for_every_family(preset, family, wan_model):
    """Guards a preset whose block leaves a family with clips its model cannot take: every preset
    validates for every family, with the family's frame rule and whole latent patches."""
    assert set(family_names()) == {"cogvideox", "wan"}  # a new family must get a model here
    model = {"cogvideox": "THUDM/CogVideoX-5b", "wan": wan_model}[family]
    config = load_config(preset, [f"model={model}"])
    spec = config.model_spec
    assert spec.family == family
    assert (config.data.num_frames - 1) % spec.frame_step == 0
    assert config.data.height % spec.size_multiple == 0 and config.data.width % spec.size_multiple == 0
    if config.ticft is not None:
        assert config.ticft.parsed_layout.pixel_frames == config.data.num_frames


def test_the_frame_rule_is_the_models(wan_model):
    """Guards checking every model against CogVideoX's 8k+1: 13 frames (4k+1) is a valid Wan clip, not
    a CogVideoX one; 11 is neither, and the error states the model's rule."""
    assert load_config("conservative", [f"model={wan_model}", "data.num_frames=13"]).data.num_frames == 13
    with pytest.raises(TrainConfigError, match=r"8k\+1"):
        load_config("conservative", ["data.num_frames=13"])
    with pytest.raises(TrainConfigError) as error:
        load_config("conservative", [f"model={wan_model}", "data.num_frames=11"])
    assert "data.num_frames must be 4k+1" in str(error.value) and "\n" not in str(error.value)


def test_the_family_is_known_without_weights(wan_model, tmp_path):
    """Guards resolution that needs a download or a load: built-in and known names, a folder's spec file,
    and a hub id nobody has downloaded (the preset's own, CogVideoX values) all answer at once."""
    assert model_family("tiny") == model_family("THUDM/CogVideoX-5b") == "cogvideox"
    assert model_family(wan_model) == "wan"
    assert model_family("someone/not-downloaded") == "cogvideox"  # HF_HUB_OFFLINE, empty HF_HOME: unknown
    assert load_config("conservative", ["model=someone/not-downloaded"]).data.fps == 8


def _write_preset(folder: Path, monkeypatch, name: str, families: dict) -> str:
    monkeypatch.setattr("trainer.config.PRESETS_DIR", folder)
    tree = _preset_tree("tiny-smoke") | {FAMILIES_KEY: families}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    return name


@pytest.mark.parametrize(
    "families, message",
    [
        ({"wan": {"lora": {"rnk": 4}}}, "preset broken: families.wan.lora.rnk is no such setting (did you mean lora.rank?)"),
        ({"hunyuan": {"data": {"fps": 24}}}, "preset broken: families.hunyuan is not a model family (known: cogvideox, wan)"),
        ({"wan": {"model": "tiny"}}, "preset broken: families.wan.model: the model picks the family block"),
        ({"wan": [1, 2]}, "preset broken: families.wan must be a mapping of settings"),
    ],
)
def test_a_bad_family_block_is_one_sentence_naming_the_preset(families, message, tmp_path, monkeypatch):
    """Guards a typo in a family block being ignored (or found only by the run that uses that family):
    every block is checked on every load, CogVideoX runs included, in one line naming the preset."""
    preset = _write_preset(tmp_path, monkeypatch, "broken", families)
    with pytest.raises(TrainConfigError) as error:
        load_config(preset)  # a tiny (CogVideoX) run: the Wan block is still checked
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_shows_the_resolved_values(wan_model, capsys):
    """Guards `slapgen config` printing the preset's CogVideoX values (or its raw `families:` block) for a
    Wan run: it prints what the run would use, and that output loads back to the same config."""
    from trainer.cli import main as cli_main

    assert cli_main(["config", "aggressive", "--set", f"model={wan_model}"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert FAMILIES_KEY not in printed
    assert (printed["data"]["width"], printed["lora"]["rank"], printed["optim"]["learning_rate"]) == (832, 64, 5e-5)
    assert TrainConfig.model_validate(printed) == load_config("aggressive", [f"model={wan_model}"])


@pytest.mark.slow
def test_tiny_smoke_trains_on_tiny_wan(demo_dataset, tiny_wan_cache_dir, tmp_path):
    """`slapgen train --config tiny-smoke --set model=tiny-wan` trains (issue 22, through the CLI) with tiny-wan's
    values: its 16 fps in the run's config, every step logged with a finite loss, a validation video, a
    rank-4 LoRA on Wan's attention blocks. (Steps and clips cut to keep it short.)"""
    import numpy as np
    from safetensors import safe_open

    from trainer.cli import main as cli_main
    from trainer.lora import read_lora_metadata

    run = tmp_path / "run"
    settings = ["model=tiny-wan", f"model_cache_dir={tiny_wan_cache_dir}", "train.max_train_steps=2", "optim.lr_warmup_steps=1",
                "validation.every_steps=2", "checkpoint.every_steps=2", "data.max_clips=2", "logging.tensorboard=false"]
    assert cli_main(["train", "--config", "tiny-smoke", "--data", str(demo_dataset), "--out", str(run),
                     *sum((["--set", item] for item in settings), [])]) == 0
    config = load_config(run / "config.yaml")
    assert config.model_spec.family == "wan" and config.data.fps == 16
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2]
    assert all(np.isfinite(row["loss"]) for row in logged)
    assert (run / "validation" / "step-000002" / "prompt-00.mp4").stat().st_size > 0
    adapter = run / "pytorch_lora_weights.safetensors"
    assert int(read_lora_metadata(adapter)["slapgen.rank"]) == config.lora.rank == 4
    with safe_open(adapter, "pt") as weights:
        assert any(".blocks.0.attn1.to_q." in key for key in weights.keys())


def test_the_clip_size_is_checked_against_the_models_own_patch_multiple(tmp_path):
    """Guards Wan 2.2 TI2V-5B (16x VAE, 2x2 patches: multiples of 32) accepting a height that is only a
    multiple of 16: the config validated sizes against CogVideoX's 16 whatever the model, and training then
    failed in a shape-mismatch traceback (31 latent rows patched into 30)."""
    from slapgen.models.wan import WAN22_TI2V_5B

    assert WAN22_TI2V_5B.size_multiple == 16 * 2
    with pytest.raises(TrainConfigError, match=r"data.height must be a multiple of 32 for "
                                               r"Wan-AI/Wan2.2-TI2V-5B-Diffusers, got 496"):
        load_config("conservative", ["model=Wan-AI/Wan2.2-TI2V-5B-Diffusers", "data.height=496"])
    assert load_config("conservative", ["model=Wan-AI/Wan2.2-TI2V-5B-Diffusers", "data.height=512"]).data.height == 512


# Each known Wan model's published frame rate (slapgen.models.wan: Wan 2.1's 16 fps, WanPipeline's export
# rate; Wan 2.2 TI2V-5B's model card: "121 frames (24 fps for 5s)").
WAN_MODEL_FPS = [("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 16), ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 16),
                 ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 24)]


@pytest.mark.parametrize("model, fps", WAN_MODEL_FPS)
@pytest.mark.parametrize("preset", ["conservative", "aggressive"])
def test_a_wan_preset_samples_clips_at_each_wan_models_own_fps(preset, model, fps):
    """Guards the presets' Wan blocks giving every Wan model Wan 2.1's 16 fps (Wan 2.2 TI2V-5B, a 24 fps
    model, trained on clips sampled at 16): fps is the model's own; the clip stays 81 x 480 x 832 (the
    toolkits' training size, whole 32-pixel patches for 5B's VAE); `--set data.fps=12` still wins."""
    config = load_config(preset, [f"model={model}"])
    assert config.data.fps == fps
    assert (config.data.height, config.data.width, config.data.num_frames) == (480, 832, 81)
    assert load_config(preset, [f"model={model}", "data.fps=12"]).data.fps == 12
    assert load_config(preset, ["data.fps=12", f"model={model}"]).data.fps == 12


@pytest.mark.parametrize("model, fps", WAN_MODEL_FPS)
def test_ticft_on_wan_takes_each_wan_models_own_fps(model, fps):
    """Guards TIC-FT's Wan block fixing 16 fps for every Wan model: only fps is the model's own, the
    released script's 49 x 480 x 480 clip stays."""
    config = load_config("ticft", [f"model={model}"])
    assert (config.data.fps, config.data.height, config.data.width, config.data.num_frames) == (fps, 480, 480, 49)


def test_native_on_the_command_line_is_the_models_own_clip():
    """Guards `--set data.X=native` being refused or taken literally: each of the four data values becomes
    the model's spec value (Wan 2.2 TI2V-5B: 704 x 1280, 121 frames, 24 fps; CogVideoX-5b: 8 fps), the
    run's model being the one set last."""
    native = ["data.height=native", "data.width=native", "data.num_frames=native", "data.fps=native"]
    data = load_config("conservative", ["model=Wan-AI/Wan2.2-TI2V-5B-Diffusers", *native]).data
    assert (data.height, data.width, data.num_frames, data.fps) == (704, 1280, 121, 24)
    assert load_config("conservative", ["data.fps=native"]).data.fps == 8
    assert load_config("tiny-smoke", ["data.fps=native", "model=Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]).data.fps == 16


def test_native_for_a_model_known_only_after_a_download_is_one_sentence(tmp_path):
    """Guards `native` reaching validation as a string (pydantic's "Input should be a valid number") or
    silently becoming CogVideoX's value when the model has no spec without a download: one sentence naming
    the setting to pass, from `--set` or a config file alike."""
    expected = ("data.fps=native means the model's own value, but someone/not-downloaded is known only after a "
                "download; pass a number instead (--set data.fps=NUMBER)")
    with pytest.raises(TrainConfigError) as error:
        load_config("conservative", ["model=someone/not-downloaded", "data.fps=native"])
    assert str(error.value) == expected
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(yaml.safe_dump({"model": "someone/not-downloaded", "data": {"fps": "native"}}))
    with pytest.raises(TrainConfigError) as error:
        load_config(config_file)
    assert str(error.value) == expected


def test_config_prints_the_resolved_native_fps(capsys):
    """Guards `slapgen config` printing `native` (or Wan 2.1's 16) for a Wan 2.2 TI2V-5B run: it prints the
    number the run uses, 24."""
    from trainer.cli import main as cli_main

    assert cli_main(["config", "conservative", "--set", "model=Wan-AI/Wan2.2-TI2V-5B-Diffusers"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["fps"] == 24


def test_a_model_known_only_after_its_download_and_of_another_family_stops_the_run(demo_dataset, tiny_wan_cache_dir,
                                                                                     tmp_path):
    """Guards a Wan model that only a download identifies (an uncached hub id) silently training on the
    preset's CogVideoX values: the preset's family block is chosen before the download, so the run, once
    the model resolves as Wan, stops with one sentence saying to run again (the model is then cached and
    known) and leaves no run folder. A folder that appears between config and start stands in for the
    download."""
    import shutil

    from slapgen.models.tiny_wan import materialise_tiny_wan_model
    from trainer.config import check_preset_family
    from trainer.run_folder import names_in
    from trainer.train import setup

    model = tmp_path / "downloaded" / "wan-finetune"
    config = load_config("tiny-smoke", [f"model={model}"])
    assert config.data.fps == load_config("tiny-smoke").data.fps  # the preset's own (CogVideoX) values
    shutil.copytree(materialise_tiny_wan_model(tiny_wan_cache_dir), model)
    run = tmp_path / "run"
    with pytest.raises(TrainConfigError) as error:
        setup(config, demo_dataset, run, resume=None, progress=False, existing=names_in(run))
    assert str(error.value) == (
        f"{model} is a wan model, but the preset's cogvideox values were applied because the model was not known "
        "before its download; run the same command again: the model is now in the local cache, so the preset's "
        "wan values apply")
    assert not run.exists()
    # Run again: the model is known now, the preset's Wan block applies, and the check passes.
    again = load_config("tiny-smoke", [f"model={model}"])
    assert again.data.fps == 16
    check_preset_family(again, again.model_spec)


@pytest.fixture
def model_known_after_download(hub, tiny_wan_cache_dir) -> str:
    """A Wan model that only a download identifies: the tiny Wan twin as a repository of a real HTTP hub
    (tests/fake_hub.py), which the test's empty Hugging Face cache does not hold."""
    from slapgen.models.loading import spec_without_weights
    from slapgen.models.tiny_wan import materialise_tiny_wan_model

    model = "someone/wan-finetune"
    hub.add_repo(model, materialise_tiny_wan_model(tiny_wan_cache_dir))
    assert spec_without_weights(model) is None
    return model


def test_slapgen_train_downloads_an_unknown_model_first_and_applies_its_familys_block(model_known_after_download,
                                                                                        demo_dataset, tmp_path,
                                                                                        monkeypatch):
    """Guards `slapgen train` stopping (or, before, silently training on CogVideoX values) for a Wan model
    that only a download identifies: the command downloads it first, then reads the preset again, so the
    run gets the preset's Wan block; `train` records the config it is given."""
    import trainer.train
    from trainer.cli import main as cli_main

    model = model_known_after_download
    given = []
    monkeypatch.setattr(trainer.train, "train", lambda config, *args, **kwargs: given.append(config))
    assert cli_main(["train", "--config", "tiny-smoke", "--data", str(demo_dataset), "--out", str(tmp_path / "run"),
                     "--set", f"model={model}"]) == 0
    (config,) = given
    assert config.data.fps == 16 and config.model_spec.family == "wan"


def test_a_sweep_plans_a_model_known_only_after_its_download_with_its_familys_values(model_known_after_download,
                                                                                     tmp_path):
    """Guards sweeps of a Wan model only a download identifies: each run was planned (and saved in sweep.json)
    with the preset's CogVideoX values and no LoRA targets before the download, so pool and Ray runs, which
    read their config back from sweep.json, trained Wan on CogVideoX's fps and guidance, and a rerun of the
    sweep was refused as changed once the model was cached. Planning downloads the model first: the runs get
    the Wan block and the family's targets, and planning again gives the same runs."""
    from slapgen.models.family import family_of
    from trainer.sweep.grid import parse_axis, plan_runs

    model = model_known_after_download
    plan = lambda: plan_runs("tiny-smoke", [f"model={model}"], [parse_axis("lora.rank=2,4")], tmp_path / "cache")
    runs = plan()
    wan = family_of(runs[0].config.model_spec)
    assert [(run.config.data.fps, run.config.validation.guidance_scale) for run in runs] == [(16, 5.0)] * 2
    assert all(run.config.lora.target_modules == list(wan.lora_target_modules) for run in runs)
    saved = [TrainConfig.model_validate(run.config.model_dump(mode="json")) for run in runs]  # as sweep.json holds
    assert [(config.data.fps, config.lora.target_modules) for config in saved] == [
        (16, list(wan.lora_target_modules))] * 2
    assert [run.config for run in plan()] == [run.config for run in runs]
