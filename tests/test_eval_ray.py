"""`slapgen eval --ray`: the videos generated as Ray tasks (one shard per system) on a cluster of this machine
give eval.json the numbers of the same eval in one process, and the same decoded frames; a retried shard keeps
the mp4s its lost attempt finished; the options' misuses are one sentence."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from slapgen.video import read_mp4, write_mp4_atomic
from tests.conftest import REPO_ROOT, cli_stderr, offline_env, write_test_adapter
from trainer.cli import main as cli_main
from trainer.evaluate.ray_shards import ATTEMPT_MARK, PLAN_FILE, SHARD_LOG

SETTINGS = ["num_frames=17", "height=32", "width=48", "num_inference_steps=2"]


def eval_command(tiny_cache_dir: Path, heldout: Path, lora: Path, out: Path, *extra: str, seeds: str = "1") -> list[str]:
    return [sys.executable, "-m", "trainer", "eval", "--model", "tiny", "--adapter", f"random={lora}", "--heldout",
            str(heldout), "--out", str(out), "--max-clips", "2", "--seeds", seeds, "--device", "cpu",
            *[f"--set={s}" for s in SETTINGS], *extra]


def attempts(out: Path, system: str) -> list[tuple[str, int]]:
    """(node id, pid) of each attempt at a system's shard, from its shard.log."""
    log = out / "videos" / system / SHARD_LOG
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [(node, int(pid)) for node, pid in re.findall(rf"{ATTEMPT_MARK} (\w+) \(\S+\), pid (\d+)", text)]


@pytest.mark.slow
def test_eval_on_ray_gives_the_numbers_and_frames_of_one_process(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards the sharded path: shards that generate other videos than one process would (another seed, prompt,
    setting or adapter per shard), a video missing or scored twice, metrics gathered in another order or from
    another place than the unsharded run's, and a driver without one bar (with its ETA) over every shard. The
    same eval (base + a LoRA, 2 prompts, 1 seed) runs in one process and with `--ray local --gpus-per-run 0`:
    eval.json's metrics, per-video scores, A/B and held-out losses are equal, and every mp4 decodes to the same
    frames."""
    lora = write_test_adapter(tmp_path / "lora", tiny_cache_dir, rank=4, seed=3)
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir), HOME=str(tmp_path / "home"))  # its own ~/.ray
    here, sharded = tmp_path / "here", tmp_path / "sharded"
    # A video an earlier eval left where this one writes: never kept as this eval's.
    write_mp4_atomic(np.zeros((9, 32, 48, 3), np.uint8), sharded / "videos" / "random" / "p000-s1.mp4", 8)
    runs = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for command in (eval_command(tiny_cache_dir, demo_dataset, lora, here),
                            eval_command(tiny_cache_dir, demo_dataset, lora, sharded, "--ray", "local",
                                         "--gpus-per-run", "0"))]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (_, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr[-4000:]
    expected = json.loads((here / "eval.json").read_text())
    got = json.loads((sharded / "eval.json").read_text())

    assert set(expected["systems"]) == {"base", "random"}
    assert got["systems"] == expected["systems"]  # metrics (held-out loss, CLIP, FVD, temporal), A/B, FVD detail
    assert got["videos"] == expected["videos"] and len(expected["videos"]) == 4  # 2 systems x 2 prompts x 1 seed
    assert got["prompts"] == expected["prompts"]
    assert got["metric_definitions"] == expected["metric_definitions"]
    assert got["engine"]["ray"] == {"address": "local", "gpus_per_shard": 0, "shards": 2}
    for video in expected["videos"]:
        mine, theirs = read_mp4(here / video["path"])[0], read_mp4(sharded / video["path"])[0]
        assert mine.shape == theirs.shape and np.array_equal(mine, theirs), video["path"]

    for system in ("base", "random"):  # each system a shard: one attempt, in a Ray worker, not the driver
        log = (sharded / "videos" / system / SHARD_LOG).read_text()
        assert len(re.findall(rf"{ATTEMPT_MARK} \w+ \(\S+\), pid \d+", log)) == 1, log[-2000:]
    assert (sharded / "videos" / PLAN_FILE).is_file()
    progress = outputs[1][1].replace("\r", "\n")
    assert re.search(r"generate \(2 shards on Ray\): +100%.* 4/4 \[", progress), progress[-3000:]
    assert re.search(r"generate \(2 shards on Ray\): .*<\d\d:\d\d", progress), progress[-3000:]  # tqdm's ETA


@pytest.mark.slow
def test_a_node_killed_mid_shard_leaves_the_numbers_of_one_process(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards the cluster path when a node dies: a shard not retried (the eval fails or hangs), a retry on the
    dead node, a retry that makes again the videos its lost attempt had finished, and numbers that differ from
    the same eval in one process. A head and a second node (`ray start`, as tests/test_sweep_ray.py); the second
    node is SIGKILLed once its shard has finished some of its 4 videos; the shard's retry runs on the head, the
    finished mp4s are the same files (inode and mtime), and eval.json's numbers equal the one-process run's."""
    from tests.test_sweep_ray import _on_node, two_node_cluster

    lora = write_test_adapter(tmp_path / "lora", tiny_cache_dir, rank=4, seed=3)
    # A HOME of its own: a `--ray local` cluster earlier in the session leaves ~/.ray/auth_token, with which
    # `ray start` of the second node fails Ray's token authentication against this head.
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir), HOME=str(tmp_path / "home"))
    here, out = tmp_path / "here", tmp_path / "killed"
    reference = subprocess.Popen(eval_command(tiny_cache_dir, demo_dataset, lora, here, seeds="1,2"), cwd=REPO_ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with two_node_cluster(env) as (address, cluster_env, groups):
            with (tmp_path / "driver.err").open("w") as stderr:
                driver = subprocess.Popen(eval_command(tiny_cache_dir, demo_dataset, lora, out, "--ray", "auto",
                                                       "--gpus-per-run", "0", seeds="1,2"), cwd=REPO_ROOT,
                                          env={**cluster_env, "RAY_ADDRESS": address}, stdout=subprocess.DEVNULL,
                                          stderr=stderr, text=True)
                victim, at_kill = None, {}
                deadline = time.monotonic() + 900
                while victim is None and driver.poll() is None and time.monotonic() < deadline:
                    for system in ("base", "random"):
                        tried = attempts(out, system)
                        done = sorted((out / "videos" / system).glob("p*.mp4"))  # not the hidden staging files
                        if len(tried) == 1 and _on_node(tried[0][1], groups["worker"]) and 0 < len(done) < 4:
                            os.killpg(groups["worker"], signal.SIGKILL)  # the node: its raylet and agents
                            os.kill(tried[0][1], signal.SIGKILL)  # and its task's worker, at once, as a dead machine
                            victim = system
                            at_kill = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in done}
                            break
                    time.sleep(0.05)
                assert victim is not None, (tmp_path / "driver.err").read_text()[-3000:]
                driver.wait(timeout=900)
            assert driver.returncode == 0, (tmp_path / "driver.err").read_text()[-3000:]
        reference_output, _ = reference.communicate(timeout=900)
        assert reference.returncode == 0, reference_output[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()

    (first_node, _), (second_node, _) = attempts(out, victim)  # exactly two attempts: the killed one and its retry
    assert second_node != first_node  # the retry ran on the head, not on the dead node
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in at_kill} == at_kill  # not made again
    expected = json.loads((here / "eval.json").read_text())
    got = json.loads((out / "eval.json").read_text())
    assert got["systems"] == expected["systems"] and got["videos"] == expected["videos"]
    assert len(expected["videos"]) == 8  # 2 systems x 2 prompts x 2 seeds


@dataclass(frozen=True)
class FakeParams:
    """The generation settings `run.generate` reads: fps, and replace() for each video's prompt and seed."""
    fps: int = 8
    prompt: str = ""
    seed: int = 0
    adapter: str | None = None

    def replace(self, **changes) -> FakeParams:
        return replace(self, **changes)


class RecordingGenerator:
    """Makes a 2-frame video whose pixels are its seed; records each (prompt, seed) it was asked for."""

    def __init__(self) -> None:
        self.made: list[tuple[str, int]] = []

    def generate_frames(self, params: FakeParams, on_step) -> np.ndarray:
        self.made.append((params.prompt, params.seed))
        return np.full((2, 16, 16, 3), params.seed * 10, np.uint8)


def test_a_retried_shard_keeps_the_videos_its_lost_attempt_finished(tmp_path):
    """Guards a shard retried after its node was lost making again every video the lost attempt had already
    written (hours of GPU time on a real model) or, worse, appending them twice: with `keep_existing`, an mp4
    at a video's path is kept as it is and listed once; the others are generated. Without it (one process,
    the default), every video is made."""
    from trainer.evaluate.options import AdapterArg, EvalOptions
    from trainer.evaluate.run import Timer, generate, video_path
    from trainer.evaluate.systems import System

    options = EvalOptions(model="tiny", adapters=(AdapterArg("a", tmp_path),), heldout=tmp_path, out=tmp_path,
                          seeds=(1, 2), metrics=("temporal",))
    system = System("base", None)
    finished = video_path(tmp_path, "base", 0, 1)
    write_mp4_atomic(np.full((2, 16, 16, 3), 200, np.uint8), finished, 8)
    before = finished.read_bytes()
    generator = RecordingGenerator()
    videos = generate(generator, [system], {"base": None}, ["p0", "p1"], [tmp_path, tmp_path], FakeParams(), options,
                      tmp_path, Timer(), keep_existing=True)
    assert generator.made == [("p0", 2), ("p1", 1), ("p1", 2)]
    assert finished.read_bytes() == before
    assert [(v.prompt, v.seed, v.path) for v in videos] == [(p, s, video_path(tmp_path, "base", p, s))
                                                            for p in (0, 1) for s in (1, 2)]
    assert all(path.is_file() for path in (v.path for v in videos))
    again = RecordingGenerator()
    generate(again, [system], {"base": None}, ["p0", "p1"], [tmp_path, tmp_path], FakeParams(), options, tmp_path, Timer())
    assert again.made == [("p0", 1), ("p0", 2), ("p1", 1), ("p1", 2)]


@pytest.mark.parametrize(("extra", "message"), [
    (["--gpus-per-run", "1"], "--gpus-per-run applies to --ray only: without it eval generates every video in this "
                              "process"),
    (["--ray", "local", "--gpus-per-run", "-1"], "--gpus-per-run must be 0 (a CPU-only cluster) or more, not -1"),
])
def test_gpus_per_run_misuse_is_one_sentence(extra, message, tmp_path, capsys):
    """Guards --gpus-per-run silently ignored without --ray (eval would generate here as if it had not been
    given) and a negative GPU count reaching Ray; nothing is written."""
    code = cli_main(["eval", "--model", "tiny", "--heldout", str(tmp_path), "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    assert cli_stderr(capsys.readouterr().err) == f"slapgen eval: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_local_without_the_gpus_a_shard_asks_for_is_one_sentence(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards `--ray local` on a machine without GPUs and the default --gpus-per-run 1: Ray would queue every
    shard forever for a GPU no node has. Stops with one sentence before the output folder is written."""
    lora = write_test_adapter(tmp_path / "lora", tiny_cache_dir, rank=4, seed=3)
    out = tmp_path / "out"
    done = subprocess.run(eval_command(tiny_cache_dir, demo_dataset, lora, out, "--ray", "local"), cwd=REPO_ROOT,
                          env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir), CUDA_VISIBLE_DEVICES="",
                                              HOME=str(tmp_path / "home")),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert cli_stderr(done.stderr) == ("slapgen eval: no node of the Ray cluster has 1 GPU(s) for a shard (the most a "
                                       "node has is 0); use --gpus-per-run 0 on a machine without GPUs")
    assert not out.exists()
