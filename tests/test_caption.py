"""`slapgen caption`: the tiny Qwen3-VL through the real loading path, a real CLI process that is
killed and resumed, the retry-then-flag policy, and captioned clips that curate and train."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, offline_env, tiny_train_overrides
from trainer.captioning.run import STATE_FILE, caption_prompts, caption_with_retry
from trainer.cli import main as cli_main
from trainer.curate.captions import check_caption
from trainer.datasets import read_dataset

# transformers' video processors need torchvision, and PyPI's torchvision does not import beside the CPU
# torch 2.13.0 the main suite runs on (README). CI runs this file a second time in a venv with torch
# 2.14.1 + torchvision 0.29.1 (.ci/caption-tests) with SLAP_REQUIRE_TORCHVISION=1: there a missing
# torchvision fails instead of skipping.
if os.environ.get("SLAP_REQUIRE_TORCHVISION"):
    importlib.import_module("torchvision")
    HAVE_TORCHVISION = True
else:
    try:
        importlib.import_module("torchvision")
        HAVE_TORCHVISION = True
    except (ImportError, RuntimeError):
        HAVE_TORCHVISION = False
needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="captioning needs torchvision, which this venv "
                                       "lacks (.ci/caption-tests runs these with it)")

GOOD = ("Power slap: the athlete in the red shirt plants his feet on the left, shifts his weight back and winds "
        "up, then whips his open hand forward. The palm lands flush on the cheek with a loud impact and the "
        "defender's head snaps sideways while the skin ripples. He absorbs the blow and resets his stance. A "
        "static wide camera frames both athletes and the table under bright arena lights.")
REFUSAL = "I'm sorry, but as an AI language model I cannot watch videos."


def test_garbage_is_retried_once_with_the_stricter_prompt_then_flagged():
    """Guards the retry policy: a caption failing the checks gets exactly one more try, with the
    strict prompt naming why; a good first caption is kept without a retry; two failures give None."""
    prompts = []

    def scripted(*answers):
        replies = iter(answers)

        def generate(prompt, seed):
            prompts.append((prompt, seed))
            return next(replies)
        return generate

    assert caption_with_retry(scripted(GOOD), "a.mp4", 0) == (GOOD, [{"prompt": "domain", "caption": GOOD, "issues": []}])
    assert prompts == [(caption_prompts()["prompt"], prompts[0][1])]
    prompts.clear()
    caption, attempts = caption_with_retry(scripted(REFUSAL, GOOD), "a.mp4", 0)
    assert caption == GOOD and [a["prompt"] for a in attempts] == ["domain", "strict"]
    assert prompts[1][0] == caption_prompts()["strict_prompt"].format(reasons="refusal, does not describe a video, too short")
    assert prompts[0][1] != prompts[1][1]  # the retry samples afresh
    prompts.clear()
    caption, attempts = caption_with_retry(scripted(REFUSAL, "word " * 150), "a.mp4", 0)
    assert caption is None and attempts[1]["issues"] == ["caption_too_long", "caption_garbage"]


def _uncaptioned(demo_dataset, folder, count=4):
    folder.mkdir()
    for index in range(count):
        shutil.copy(demo_dataset / f"clip_{index % 4:03d}.mp4", folder / f"clip_{index:03d}.mp4")  # the demo set has 4
    return folder


def _caption_command(folder, *extra):
    return [sys.executable, "-m", "trainer", "caption", str(folder), "--model", "tiny", "--device", "cpu", *extra]


@needs_torchvision
def test_tiny_model_loads_through_the_hub_path(tiny_cache_dir):
    """Guards the tiny twin drifting from the real loading path: it is a saved folder that
    AutoProcessor / AutoModelForImageTextToText open, a Qwen3-VL that takes video."""
    from transformers import AutoConfig

    from trainer.captioning.model import VideoCaptioner, resolve_caption_model

    folder = resolve_caption_model("tiny", tiny_cache_dir)
    assert AutoConfig.from_pretrained(folder).model_type == "qwen3_vl"
    captioner = VideoCaptioner.load(folder)
    assert type(captioner.processor).__name__ == "Qwen3VLProcessor"
    assert type(captioner.model).__name__ == "Qwen3VLForConditionalGeneration"


@needs_torchvision
@pytest.mark.slow
def test_caption_cli_resumes_after_sigkill_and_matches_an_uninterrupted_run(demo_dataset, tiny_cache_dir, tmp_path):
    """Guards a killed run losing or corrupting captions, redoing finished clips, or overwriting a
    caption: SIGKILL after the first caption lands, run again, and every clip has the caption an
    uninterrupted run writes (sampling is seeded per clip); the hand-written caption is untouched."""
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir))
    reference = _uncaptioned(demo_dataset, tmp_path / "reference")
    done = subprocess.run(_caption_command(reference), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "captioned 4 clips, flagged 0" in done.stdout
    expected = {p.name: p.read_text() for p in sorted(reference.glob("*.txt"))}
    assert len(expected) == 4 and all(not check_caption(text).issues for text in expected.values())

    data = _uncaptioned(demo_dataset, tmp_path / "data", count=5)
    (data / "clip_004.txt").write_text("hand written\n")
    process = subprocess.Popen(_caption_command(data), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (data / "clip_000.txt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written_before = {p.name for p in data.glob("clip_00[0-3].txt")}
    assert written_before and len(written_before) < 4, "the kill came too late to test a resume"
    for name in written_before:
        assert (data / name).read_text() == expected[name]  # whole, never half-written
    resumed = subprocess.run(_caption_command(data), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"captioned {4 - len(written_before)} clips" in resumed.stdout
    assert {p.name: p.read_text() for p in sorted(data.glob("clip_00[0-3].txt"))} == expected
    assert (data / "clip_004.txt").read_text() == "hand written\n"


@needs_torchvision
def test_captions_that_fail_twice_are_flagged_not_written(demo_dataset, tiny_cache_dir, tmp_path, capsys):
    """Guards garbage reaching the dataset: with 8 new tokens every caption is too short, is retried
    once with the strict prompt and then flagged in the state file, with no clip.txt; a second run
    leaves flagged clips alone unless --retry-flagged."""
    data = _uncaptioned(demo_dataset, tmp_path / "data", count=2)
    assert cli_main(["caption", str(data), "--model", "tiny", "--device", "cpu", "--max-new-tokens", "8"]) == 0
    assert "captioned 0 clips, flagged 2 (retried 2)" in capsys.readouterr().out
    assert not list(data.glob("*.txt"))
    flagged = json.loads((data / STATE_FILE).read_text())["flagged"]
    assert sorted(flagged) == ["clip_000.mp4", "clip_001.mp4"]
    for entry in flagged.values():
        assert [a["prompt"] for a in entry["attempts"]] == ["domain", "strict"]
        assert all("caption_too_short" in a["issues"] for a in entry["attempts"])
    assert cli_main(["caption", str(data), "--model", "tiny", "--device", "cpu"]) == 0
    assert "captioned 0 clips, flagged 0 (retried 0), left 2 alone" in capsys.readouterr().out
    assert cli_main(["caption", str(data), "--model", "tiny", "--device", "cpu", "--retry-flagged"]) == 0
    assert "captioned 2 clips" in capsys.readouterr().out
    assert json.loads((data / STATE_FILE).read_text())["flagged"] == {}


@needs_torchvision
def test_captioned_clips_curate_and_train(demo_dataset, tiny_cache_dir, tmp_path):
    """Guards captioning output the rest of the pipeline cannot use: the captioned folder curates
    with every caption passing the checks, and its selection trains a tiny LoRA to the end."""
    data = _uncaptioned(demo_dataset, tmp_path / "data", count=3)
    assert cli_main(["caption", str(data), "--model", "tiny", "--device", "cpu"]) == 0
    out = tmp_path / "curated"
    assert cli_main(["curate", str(data), "--out", str(out), "--select", "3", "--workers", "1", "--config", "tiny-smoke"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["without_caption"] == 0
    assert not [code for clip in report["clips"] for code in clip["issues"] if code.startswith("caption_")]
    selected = read_dataset(out / "selected.jsonl")
    assert len(selected) == 3
    run = tmp_path / "run"
    overrides = tiny_train_overrides(tiny_cache_dir, "train.max_train_steps=2", "optim.lr_warmup_steps=1",
                                     "checkpoint.every_steps=2")
    assert cli_main(["train", "--config", "tiny-smoke", "--data", str(out / "selected.jsonl"), "--out", str(run),
                     *sum((["--set", o] for o in overrides), [])]) == 0
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_caption_needs_a_folder_of_clips(demo_dataset, tmp_path, capsys):
    (tmp_path / "list.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": "x"}) + "\n")
    assert cli_main(["caption", str(tmp_path / "list.jsonl"), "--model", "tiny"]) == 2
    assert "folder of videos" in capsys.readouterr().err
    assert cli_main(["caption", str(demo_dataset), "--model", "tiny", "--fps", "0"]) == 2
    assert "--fps" in capsys.readouterr().err
