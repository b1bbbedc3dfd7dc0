"""Training config: presets hold the research-note values, every field is documented, YAML round-trips."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel

from trainer.cli import main as cli_main
from trainer.config import PRESETS_DIR, TrainConfig, load_config
from trainer.errors import TrainConfigError

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{name}.")


def test_every_field_is_documented():
    undocumented = [name for name, field in _fields(TrainConfig) if not (field.description or "").strip()]
    assert undocumented == []


def test_presets_match_the_research_notes():
    assert PRESETS == ["aggressive", "conservative", "ticft", "tiny-smoke"]
    conservative = load_config("conservative")
    assert conservative.model == "THUDM/CogVideoX-5b"
    assert (conservative.data.max_clips, conservative.data.num_frames, conservative.data.height,
            conservative.data.width, conservative.data.fps) == (100, 49, 480, 720, 8)
    assert (conservative.train.max_train_steps, conservative.train.batch_size, conservative.train.mixed_precision) == (4000, 2, "bf16")
    assert (conservative.lora.rank, conservative.lora.alpha) == (128, 128)
    o = conservative.optim
    assert (o.optimizer, o.learning_rate, o.adam_beta1, o.adam_beta2, o.lr_scheduler, o.lr_warmup_steps, o.max_grad_norm) == (
        "adam", 1e-3, 0.9, 0.95, "cosine_with_restarts", 200, 1.0)

    aggressive = load_config("aggressive")
    assert aggressive.data.max_clips == 1000 and aggressive.train.max_train_steps == 12000
    assert (aggressive.train.batch_size, aggressive.train.gradient_accumulation_steps) == (4, 2)
    assert (aggressive.lora.rank, aggressive.lora.alpha) == (256, 128)
    assert (aggressive.optim.optimizer, aggressive.optim.learning_rate, aggressive.optim.weight_decay) == ("adamw", 5e-4, 1e-2)

    # TIC-FT's released code (scripts/cogvideox/P2V/train.sh), not the research note's batch 2 / lr 1e-3.
    ticft = load_config("ticft")
    assert (ticft.ticft.layout, ticft.ticft.condition) == ("c1b3t9", "first-frame")
    assert (ticft.data.num_frames, ticft.data.height, ticft.data.width) == (49, 480, 480)
    assert (ticft.lora.rank, ticft.lora.alpha) == (128, 128)
    assert (ticft.train.max_train_steps, ticft.train.batch_size, ticft.train.gradient_accumulation_steps) == (6000, 1, 1)
    o = ticft.optim
    assert (o.optimizer, o.learning_rate, o.adam_beta1, o.adam_beta2, o.weight_decay, o.adam_epsilon, o.max_grad_norm,
            o.lr_scheduler, o.lr_warmup_steps) == ("adamw", 5e-5, 0.9, 0.99, 1e-4, 1e-8, 1.0, "constant_with_warmup", 1000)
    assert "train.batch_size=2 --set optim.learning_rate=1e-3" in (PRESETS_DIR / "ticft.yaml").read_text()

    smoke = load_config("tiny-smoke")
    assert smoke.model == "tiny" and smoke.train.max_train_steps <= 20 and smoke.train.mixed_precision == "no"


@pytest.mark.parametrize("preset", PRESETS)
def test_documented_yaml_round_trips(preset, tmp_path):
    config = load_config(preset, ["lora.rank=64", "train.max_train_steps=3000"])
    text = config.to_documented_yaml()
    assert "# peak learning rate (after warm-up)" in text and "# LoRA rank r" in text
    file = tmp_path / "config.yaml"
    file.write_text(text)
    assert load_config(file) == config
    assert yaml.safe_load(text)["lora"]["rank"] == 64


def test_config_subcommand_prints_the_documented_preset(capsys):
    assert cli_main(["config", "aggressive", "--set", "optim.learning_rate=2e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["learning_rate"] == 2e-4 and printed["lora"]["rank"] == 256


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.num_frames=13"], "8k+1"),
        (["data.height=100"], "data.height"),
        (["optim.lr_warmup_steps=5000", "train.max_train_steps=100"], "warm"),
        (["lora.rank"], "expected key=value"),
        (["lora.rank.x=1"], "not a section"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(TrainConfigError) as error:
        load_config("conservative", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_output_holds_no_machine_specific_path(capsys):
    """Guards `slapgen config` writing this machine's home folder into the file users start from."""
    from pathlib import Path

    assert cli_main(["config", "conservative"]) == 0
    printed = capsys.readouterr().out
    assert str(Path.home()) not in printed
    assert yaml.safe_load(printed)["model_cache_dir"] is None and yaml.safe_load(printed)["latent_cache"] is None


def test_the_models_spec_is_looked_up_once_and_follows_set_model(monkeypatch):
    """Guards `TrainConfig.model_spec` resolving the model again on every read (a folder's configs read, the
    local hub cache searched, each time a check or the trainer asked): one look-up when the config is validated,
    none on reads, and a `--set model=...` gets the spec of the model it names."""
    import trainer.config as config_module

    looked_up = []
    real = config_module.spec_without_weights
    monkeypatch.setattr(config_module, "spec_without_weights", lambda model: looked_up.append(model) or real(model))
    config = TrainConfig.model_validate({"model": "tiny-wan", "data": {"height": 64, "width": 96, "num_frames": 9}})
    assert looked_up == ["tiny-wan"]
    assert [config.model_spec.name for _ in range(3)] == ["tiny-wan"] * 3 and looked_up == ["tiny-wan"]
    assert config.model_copy(update={"latent_cache": "cache"}).model_spec.name == "tiny-wan"

    overridden = load_config("tiny-smoke", ["model=tiny-wan"])
    assert (overridden.model, overridden.model_spec.name, overridden.model_spec.family) == ("tiny-wan", "tiny-wan", "wan")
    assert load_config("tiny-smoke").model_spec.family == "cogvideox"


def test_load_config_looks_the_models_spec_up_once(monkeypatch):
    """Guards `load_config` looking the run's model up three times for one config (a folder's configs read or
    the local hub cache searched each time): for the preset's family block, for its `native` values and
    again when the config was validated. One look-up per load now, and the spec is the model's."""
    import trainer.config as config_module

    looked_up = []
    real = config_module.spec_without_weights
    monkeypatch.setattr(config_module, "spec_without_weights", lambda model: looked_up.append(model) or real(model))
    config = load_config("tiny-smoke", ["model=tiny-wan"])  # its Wan block sets data.fps: native
    assert looked_up == ["tiny-wan"]
    assert (config.model_spec.name, config.data.fps) == ("tiny-wan", real("tiny-wan").fps)
