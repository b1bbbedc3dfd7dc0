"""Multi-node training is accelerate's: two `accelerate launch` processes, machine ranks 0 and 1 of
`--num_machines 2`, on this machine (CPU, gloo), train tiny-smoke as one data-parallel run; the result
is the same run as two processes of one machine (README: Train a LoRA, "Several machines")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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
    port = str(free_port())  # below the ephemeral range: rank 1 cannot connect to itself (conftest.free_port)
    logs = [tmp_path / f"machine-{rank}.log" for rank in ("0", "1")]
    machines = [subprocess.Popen(launch(tiny_cache_dir, demo_dataset, tmp_path / "two-machines", "--num_machines", "2",
                                        "--machine_rank", rank, "--main_process_ip", "127.0.0.1", "--main_process_port", port),
                                 cwd=REPO_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)  # its own process group: the training ranks go with it
                for rank, log in zip(("0", "1"), logs)]
    try:
        _wait_for_all(machines, timeout_s=600)
    finally:  # a rank left waiting at the rendezvous must not outlive the test
        for machine in machines:
            if machine.poll() is None:
                os.killpg(machine.pid, signal.SIGKILL)  # the launcher and the ranks torchrun started
                machine.wait()
    for rank, (machine, log) in enumerate(zip(machines, logs)):
        both = "\n".join(f"--- machine {k} ---\n{path.read_text()[-3000:]}" for k, path in enumerate(logs))
        assert machine.returncode == 0, f"machine {rank} ended with {machine.returncode}\n{both}"
    # After the two machines, not beside them: four training processes at once on two cores is what made
    # a slow rank 0 slower still.
    one_machine = subprocess.run(launch(tiny_cache_dir, demo_dataset, tmp_path / "one-machine", "--num_machines", "1",
                                        "--main_process_port", str(free_port())),
                                 cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
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


def _wait_for_all(processes: list[subprocess.Popen], timeout_s: float) -> None:
    """Until every process has ended, one has failed (the others would wait for it at the rendezvous until
    torch's own timeout: that is stopped now, not after minutes), or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [process.poll() for process in processes]
        if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
            return
        time.sleep(0.5)


def _one_process(tiny_cache_dir, data, tmp_path, env):
    out = tmp_path / "one-process"
    command = [sys.executable, "-m", "trainer", "train", "--config", "tiny-smoke", "--data", str(data), "--out", str(out),
               *sum((["--set", item] for item in tiny_train_overrides(tiny_cache_dir, *SETTINGS)), [])]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
