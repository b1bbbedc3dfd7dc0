"""`slapgen sweep` and `slapgen eval` on a Wan model (`tiny-wan`), unchanged: a 2-run sweep (loss and
generation metrics, the base model evaluated once) and `slapgen eval` of one of its LoRAs. Each number
is checked against the held-out objective computed here with plain diffusers + peft on the saved LoRA.
Small on purpose (one held-out clip, 1-frame training clips, 2 steps): the tiny Wan VAE's decode is
the cost on a CPU."""

from __future__ import annotations

import csv
import json
import math

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from slapgen.models.loading import resolve_model
from slapgen.video import read_mp4
from tests.conftest import tiny_train_overrides
from trainer.cli import main as cli_main
from trainer.config import DataConfig, load_config
from trainer.heldout import heldout_entries, heldout_losses
from trainer.lora import LORA_FILENAME, add_lora, load_lora_into

pytestmark = pytest.mark.slow

TRAIN_SETS = ("model=tiny-wan", "data.height=32", "data.width=32", "data.num_frames=1", "data.max_clips=2",
              "train.max_train_steps=2", "optim.lr_warmup_steps=1", "checkpoint.every_steps=10",
              "train.gradient_checkpointing=false")
EVAL_SETS = ("num_frames=5", "height=32", "width=48", "num_inference_steps=1")
TEMPORAL = ("subject_consistency_dino", "temporal_flickering")


@pytest.fixture(scope="module")
def wan_sweep(tiny_wan_cache_dir, tmp_path_factory):
    """A finished 2-run sweep on tiny-wan (two learning rates), `--metrics loss,temporal`, through the CLI."""
    from trainer.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("wan-sweep")
    data, heldout = root / "data", root / "heldout"
    write_demo_dataset(data, clips=2, seed=3)
    write_demo_dataset(heldout, clips=1, seed=7)
    out = root / "sweep"
    args = ["sweep", "--config", "tiny-smoke", "--grid", "optim.learning_rate=1e-3,5e-2", "--data", str(data),
            "--heldout", str(heldout), "--out", str(out), "--metrics", "loss,temporal", "--seeds", "0"]
    for item in tiny_train_overrides(tiny_wan_cache_dir, *TRAIN_SETS):
        args += ["--set", item]
    for item in EVAL_SETS:
        args += ["--eval-set", item]
    assert cli_main(args) == 0
    return {"out": out, "heldout": heldout, "root": root}


def _wan_losses(cache_dir, heldout, data: DataConfig, cache_root, lora_file=None, config=None) -> list[float]:
    """Held-out losses of tiny-wan's transformer (with the LoRA file loaded through peft) on `heldout`."""
    resolved = resolve_model("tiny-wan", cache_dir)
    entries = heldout_entries(heldout, resolved, data, cache_root, progress=False)
    transformer = WanTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer")
    if lora_file is not None:
        add_lora(transformer, config.lora)
        load_lora_into(transformer, lora_file)
    return heldout_losses(transformer, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), entries)


def test_a_wan_sweep_scores_each_run_and_the_base_model_on_the_wan_objective(wan_sweep, tiny_wan_cache_dir, tmp_path):
    """Guards a sweep that cannot run on Wan (the tiny base model's evaluation models looked up on the hub for
    `tiny-wan`, a CogVideoX transformer or scheduler loaded for the runs or the base model): results.csv
    holds both runs, each run's held-out loss is its saved LoRA's Wan objective (recomputed here), the base
    model's is the plain transformer's, and each run and the base were generated and scored (temporal)."""
    out = wan_sweep["out"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [float(row["optim.learning_rate"]) for row in rows] == [1e-3, 5e-2]
    data = load_config("tiny-smoke", tiny_train_overrides(tiny_wan_cache_dir, *TRAIN_SETS)).data
    data = data.model_copy(update={"max_clips": None})
    for row in rows:
        config = load_config(out / "runs" / row["run"] / "config.yaml")
        [expected] = _wan_losses(tiny_wan_cache_dir, wan_sweep["heldout"], data, tmp_path / "cache",
                                 out / "runs" / row["run"] / LORA_FILENAME, config)
        assert float(row["heldout_loss"]) == pytest.approx(expected, rel=1e-5)
        assert all(math.isfinite(float(row[column])) for column in TEMPORAL)
    base = json.loads((out / "base" / "sweep_result.json").read_text())["heldout_losses"]
    assert base == pytest.approx(_wan_losses(tiny_wan_cache_dir, wan_sweep["heldout"], data, tmp_path / "cache"), rel=1e-5)
    combined = json.loads((out / "eval.json").read_text())
    assert list(combined["systems"]) == ["base", *(row["run"] for row in rows)]


def test_slapgen_eval_of_a_wan_lora_writes_its_heldout_loss_and_generation_metrics(wan_sweep, tiny_wan_cache_dir, tmp_path,
                                                                                  monkeypatch):
    """Guards `slapgen eval --model tiny-wan` (the tiny evaluation models for Wan's twin, a Wan LoRA in the hot-swap
    slot): eval.json holds base and the adapter with held-out loss and the temporal metrics, the held-out
    losses equal the Wan objective of the plain transformer and of the LoRA loaded through peft at eval's
    size, and the videos are mp4s of the asked size and length; `slapgen campaign create` takes the folder
    as it takes a CogVideoX one (its videos copied byte for byte)."""
    out = wan_sweep["out"]
    run = next((out / "runs").iterdir())
    code = cli_main(["eval", "--model", "tiny-wan", "--adapter", f"wan={run}", "--heldout", str(wan_sweep["heldout"]),
                     "--out", str(tmp_path / "eval"), "--metrics", "loss,temporal", "--seeds", "0", "--device", "cpu",
                     *[f"--set={item}" for item in EVAL_SETS]])
    assert code == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert list(result["systems"]) == ["base", "wan"]
    for system in result["systems"].values():
        assert set(system["metrics"]) == {"heldout_loss", *TEMPORAL}
        assert all(math.isfinite(value) for value in system["metrics"].values())
    data = DataConfig(height=32, width=48, num_frames=5, fps=16)
    config = load_config(run / "config.yaml")
    base = _wan_losses(tiny_wan_cache_dir, wan_sweep["heldout"], data, tmp_path / "cache")
    trained = _wan_losses(tiny_wan_cache_dir, wan_sweep["heldout"], data, tmp_path / "cache", run / LORA_FILENAME, config)
    assert result["systems"]["base"]["metrics"]["heldout_loss"] == pytest.approx(base[0], rel=1e-5)
    assert result["systems"]["wan"]["metrics"]["heldout_loss"] == pytest.approx(trained[0], rel=1e-5)
    assert len(result["videos"]) == 2
    for video in result["videos"]:
        frames, fps = read_mp4(tmp_path / "eval" / video["path"])
        assert frames.shape == (5, 32, 48, 3) and fps == 16

    from slapgen.campaign_store import CampaignStore

    monkeypatch.setenv("SLAP_DATA_DIR", str(tmp_path / "data"))
    assert cli_main(["campaign", "create", "wan", "--from", str(tmp_path / "eval"), "--systems", "base,wan"]) == 0
    store = CampaignStore(tmp_path / "data")
    assert store.get("wan").systems == ["base", "wan"]
    tokens = store.video_tokens("wan")
    for video in result["videos"]:
        copied = store.video_file("wan", tokens[(video["system"], 0)])
        assert copied.read_bytes() == (tmp_path / "eval" / video["path"]).read_bytes()
