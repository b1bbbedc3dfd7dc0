"""`trainer.cache_shares`: a multi-process launch's latent cache, each process encoding its share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, offline_env
from tests.harness import free_port
from trainer.cache_shares import share_of
from trainer.datasets import Clip


def test_shares_are_of_distinct_clips_and_together_every_clip_once():
    """Guards shares taken by rows: the copies of a clip a dataset repeats (oversampling) went to several processes,
    each encoding the same clip at the same time ([A, A, B, B] on 2 processes: both encoded A and B). The shares
    are disjoint, and together hold each distinct clip once, rows in the dataset's order."""
    a, b, c = (Clip(Path(f"/clips/{name}.mp4"), f"caption {name}", f"{name}.mp4") for name in "abc")
    a_recaptioned = Clip(a.video, "another caption", a.name)  # another caption: another entry
    rows = [a, a, b, b, a_recaptioned, c, c]
    shares = [share_of(rows, index, 2) for index in range(2)]
    assert shares == [[a, a_recaptioned], [b, c]]
    assert share_of(rows, 0, 1) == [a, b, a_recaptioned, c]
    assert share_of([a], 1, 2) == []  # fewer clips than processes: an empty share
    uncaptioned, empty = Clip(c.video, None, c.name), Clip(c.video, "", c.name)  # one cache entry, as keyed
    assert share_of([uncaptioned, empty], 0, 1) == [uncaptioned]


SCRIPT = """
import os, sys, json
from pathlib import Path
import torch.distributed as dist
from slapgen.models.loading import resolve_model
from trainer.cache_shares import precompute_in_shares
from trainer.config import load_config
from trainer.datasets import read_dataset
from trainer.latent_cache import LatentCache
from trainer.long_waits import LongWaits

rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
data, cache_dir, root = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
config = load_config("tiny-smoke", [f"model_cache_dir={cache_dir}"])
clips = read_dataset(data)
dist.barrier()  # both listed every clip
if sys.argv[4] == "lose-a-clip" and rank == 1:
    (data / "clip_003.mp4").unlink()  # in process 1's share: its hashing fails
cache = LatentCache(root, resolve_model("tiny", cache_dir), config.data)
try:
    report = precompute_in_shares(cache, clips, rank, LongWaits(2), progress=False)
    print(json.dumps({"encoded": report.encoded, "reused": report.reused,
                      "entries": [entry.clip.name for entry in report.entries]}))
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
"""


def run_two_processes(tmp_path: Path, data: Path, tiny_cache_dir: Path, root: Path, case: str) -> list[dict]:
    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(data), str(tiny_cache_dir), str(root), case],
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=offline_env(tmp_path, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=str(port)))
                 for rank in range(2)]
    try:
        outputs = [process.communicate(timeout=150) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [json.loads(out.strip().splitlines()[-1]) if out.strip() else {"stderr": err[-2000:]} for out, err in outputs]


@pytest.mark.slow
def test_a_failed_share_stops_every_process_with_its_error(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards a process whose share of the encoding failed leaving the others waiting for it in a barrier until the
    launcher killed them. Two real processes in one gloo group; process 1 loses a clip file of its share before
    hashing it: it stops with its own error, process 0 with one sentence naming process 1's. (Shares that succeed:
    tests/test_training.py's two-process launch, whose main process's bar counts its half of the clips.)"""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    failed = run_two_processes(tmp_path, data, tiny_cache_dir, tmp_path / "cache", "lose-a-clip")
    assert failed[1].get("error", "").startswith("FileNotFoundError: "), failed
    assert failed[0].get("error", "").startswith(
        "TrainError: process 1 of the launch could not encode its share of the clips (FileNotFoundError: "), failed


WAIT_SCRIPT = """
import os, sys, time
from datetime import timedelta
import torch.distributed as dist
from trainer.long_waits import LongWaits

rank = int(os.environ["RANK"])
# Both processes up first, on a store of their own with a minute to meet: one may come up seconds after the other
# on a loaded machine, past the 3 s the launch's group is given below
store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), 2, rank == 0, timeout=timedelta(seconds=60))
store.set(f"up{rank}", "1")
store.wait(["up0", "up1"])
# The launch's group (the default one, as accelerate's), its timeout cut to 3 s
dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=3))
waits = LongWaits(2)
if rank == 0:
    time.sleep(6)  # the main process's validation, or a longer share of the encoding
try:
    if sys.argv[1] == "long":
        waits.wait_for_everyone()
    else:
        dist.barrier()
    print("waited")
except Exception as error:
    print(type(error).__name__)
"""


@pytest.mark.slow
def test_a_wait_for_longer_than_the_launchs_timeout_outlasts_it(tmp_path):
    """Guards a launch crashing while its other processes waited for the main process's validation videos (or a
    share of the encoding) in a collective of the launch's own group: NCCL ends one after 10 minutes, and a few 5B
    videos take longer. With the launch's group's timeout cut to 3 s, a 6 s wait in it fails (the bug, reproduced);
    the same wait in `LongWaits` ends when the other process comes."""
    results = {}
    for case in ("launch", "long"):
        port = free_port()
        processes = [subprocess.Popen([sys.executable, "-c", WAIT_SCRIPT, case], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env=offline_env(tmp_path, RANK=str(rank), WORLD_SIZE="2",
                                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                     for rank in range(2)]
        try:
            results[case] = [process.communicate(timeout=120)[0].strip().splitlines()[-1:] for process in processes]
        finally:
            for process in processes:
                process.kill()
    assert results["long"] == [["waited"], ["waited"]], results
    assert results["launch"][1] == ["RuntimeError"], results  # process 1 gave up on process 0 after 3 s
