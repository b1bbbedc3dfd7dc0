"""Multi-node training is accelerate's: two `accelerate launch` processes, machine ranks 0 and 1 of
`--num_machines 2`, on this machine (CPU, gloo), train tiny-smoke as one data-parallel run; the result
is the same run as two processes of one machine (README: Train a LoRA, "Several machines")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, free_port, offline_env, tiny_train_overrides
from trainer.lora import LORA_FILENAME

SETTINGS = ("train.max_train_steps=3", "checkpoint.every_steps=2", "data.max_clips=4")


def launch(tiny_cache_dir, data, out, *machine: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", *machine,
            "--dynamo_backend", "no", "-m", "trainer", "train", "--config", "tiny-smoke", "--data", str(data),
            "--out", str(out), *sum((["--set", item] for item in tiny_train_overrides(tiny_cache_dir, *SETTINGS)), [])]


@pytest.mark.slow
def test_two_machines_train_as_two_processes_of_one_machine(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards a two-machine launch that does not form one process group (each machine training alone, or
    hanging at the rendezvous), ranks that split the data or seed their noise other than by global rank, and
    a run folder written by both machines' rank 0: the two-machine LoRA equals, tensor by tensor exactly, the
    LoRA of the same run as two processes of one machine (same global ranks, same global batch), and its
    checkpoint holds both ranks' RNG states."""
    env = offline_env(tmp_path, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    port = str(free_port())
    machines = [subprocess.Popen(launch(tiny_cache_dir, demo_dataset, tmp_path / "two-machines", "--num_machines", "2",
                                        "--machine_rank", rank, "--main_process_ip", "127.0.0.1", "--main_process_port", port),
                                 cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for rank in ("0", "1")]
    one_machine = subprocess.run(launch(tiny_cache_dir, demo_dataset, tmp_path / "one-machine", "--num_machines", "1",
                                        "--main_process_port", str(free_port())),
                                 cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    for machine, output in zip(machines, outputs):
        assert machine.returncode == 0, output[-3000:]
    assert one_machine.returncode == 0, one_machine.stderr[-3000:]

    checkpoint = tmp_path / "two-machines" / "checkpoints" / "checkpoint-000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["processes"] == 2
    assert (checkpoint / "rng-0.pt").is_file() and (checkpoint / "rng-1.pt").is_file()
    expected = load_file(tmp_path / "one-machine" / LORA_FILENAME)
    got = load_file(tmp_path / "two-machines" / LORA_FILENAME)
    assert expected.keys() == got.keys() and expected
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    # Not the one-process run: the ranks' noise is drawn per global rank (trainer.train), so it must differ.
    assert any(not torch.equal(expected[key], value) for key, value in
               load_file(_one_process(tiny_cache_dir, demo_dataset, tmp_path, env) / LORA_FILENAME).items())


def _one_process(tiny_cache_dir, data, tmp_path, env):
    out = tmp_path / "one-process"
    command = [sys.executable, "-m", "trainer", "train", "--config", "tiny-smoke", "--data", str(data), "--out", str(out),
               *sum((["--set", item] for item in tiny_train_overrides(tiny_cache_dir, *SETTINGS)), [])]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
