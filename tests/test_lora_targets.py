"""The default LoRA target modules have one source, the model family's `lora_target_modules`: the trainer's
config, the engine's slot, the service's settings and `slapgen eval` take them from the run's model's family
when nothing sets them."""

from __future__ import annotations

import pytest
import yaml

from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions
from slapgen.models.loading import resolve_model
from slapgen.models.tiny_wan import TINY_WAN_SPEC
from slapgen.models.wan import WAN
from slapgen.serving.settings import SlapSettings
from trainer.config import load_config
from trainer.evaluate.systems import slot_shape

COGVIDEOX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
OWN_TARGETS = ("to_q", "to_v")  # a family whose default differs from every other's


@pytest.fixture
def wan_with_own_targets(monkeypatch):
    monkeypatch.setattr(WAN, "lora_target_modules", OWN_TARGETS)


def test_trainer_config_takes_the_runs_familys_targets(wan_with_own_targets):
    """Guards the trainer's LoraConfig default (its own copy of CogVideoX's four names) applying to every family:
    an unset `lora.target_modules` is the family's of the run's model, written out in the config a run saves,
    and a `--set` still wins."""
    wan = load_config("tiny-smoke", ["model=tiny-wan"])
    assert wan.lora.target_modules == list(OWN_TARGETS)
    assert yaml.safe_load(wan.to_yaml())["lora"]["target_modules"] == list(OWN_TARGETS)
    assert load_config("tiny-smoke").lora.target_modules == COGVIDEOX_TARGETS  # tiny: CogVideoX's
    assert load_config("tiny-smoke", ["model=tiny-wan", "lora.target_modules=[to_k]"]).lora.target_modules == ["to_k"]


def test_a_model_known_only_after_download_gets_its_familys_targets_when_resolved(wan_with_own_targets):
    """Guards a config whose model needs a download (no spec while parsing) training with a guessed list: its
    targets stay unset until `with_model_defaults` meets the resolved model's spec, and the LoRA is never built
    from an unset list."""
    from trainer.lora import peft_config

    config = load_config("tiny-smoke", ["model=some-org/not-downloaded-model"])
    assert config.lora.target_modules is None
    with pytest.raises(ValueError, match="lora.target_modules is unset"):
        peft_config(config.lora)
    assert config.with_model_defaults(TINY_WAN_SPEC).lora.target_modules == list(OWN_TARGETS)


def test_engine_settings_and_eval_leave_the_targets_to_the_family(wan_with_own_targets, tiny_wan_cache_dir, tmp_path,
                                                                  monkeypatch):
    """Guards EngineOptions, SLAP_LORA_TARGET_MODULES and `slapgen eval`'s slot each holding their own copy of
    CogVideoX's four names: unset, the engine's slot holds exactly the modules the model's family names."""
    monkeypatch.delenv("SLAP_LORA_TARGET_MODULES", raising=False)
    assert SlapSettings().target_modules() is None
    monkeypatch.setenv("SLAP_LORA_TARGET_MODULES", "to_q,to_k,net.2")
    assert SlapSettings().target_modules() == ("to_q", "to_k", "net.2")  # set: the service's own list
    monkeypatch.delenv("SLAP_LORA_TARGET_MODULES")
    assert EngineOptions(adapters_dir=tmp_path / "adapters").lora_target_modules is None
    assert slot_shape([]) == (1, None)  # `slapgen eval` of the base model alone

    generator = VideoGenerator.load(resolve_model("tiny-wan", tiny_wan_cache_dir),
                                    EngineOptions(adapters_dir=tmp_path / "adapters", max_lora_rank=4))
    assert generator.slot.target_modules == OWN_TARGETS
    assert generator.info()["lora_target_modules"] == list(OWN_TARGETS)  # what GET /info tells a LoRA's author
    names = {name.rsplit(".", 1)[-1] for name in generator.slot.modules}
    assert names == set(OWN_TARGETS) and len(generator.slot.modules) > 2
