"""slapgen/atomic.py, which every writer (adapters, LoRA files, checkpoints, caches, reports) relies on:
a file appears whole or not at all, and nothing but the target is left in its folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from slapgen.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from tests.conftest import REPO_ROOT

OLD = b"old content, complete\n" * 1000
NEW_CHUNK = b"new content, half written\n" * 4000

# A writer that gets half-way through replacing the target, reports it, then waits (forever) for the
# parent, which kills it with SIGKILL right there: no finally, no atexit, exactly like a crash.
HALF_WRITER = """
import sys
from pathlib import Path

from slapgen.atomic import atomic_path

target, chunk = Path(sys.argv[1]), sys.argv[2].encode() * 4000
with atomic_path(target) as staging:
    with staging.open("wb") as out:
        out.write(chunk)
        out.flush()
        print(staging, flush=True)
        sys.stdin.read()  # the parent kills us here, mid-write
        out.write(chunk)
"""


def _folder_listing(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    """Guards a writer that writes the target in place (or renames before the data is complete): a real
    process is killed with SIGKILL half-way through replacing a file, and the target still holds the old
    bytes exactly. (Checked to fail with atomic_path yielding the target itself: the target then holds
    the half-written new content.)"""
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(OLD)
    writer = subprocess.Popen([sys.executable, "-c", HALF_WRITER, str(target), "new content, half written\n"],
                              cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        staging = writer.stdout.readline().strip()
        assert staging, "the writer did not get half-way"
        # Really mid-write: half of the new content is on disk, in the staging file, when the kill lands.
        with open(staging, "rb") as half:
            assert half.read() == NEW_CHUNK
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert target.read_bytes() == OLD


def test_a_normal_write_leaves_only_the_target(tmp_path):
    """Guards staging files left beside the target after a successful write (a folder of adapters or
    checkpoints filling with hidden temp files): bytes, text and a folder each leave exactly their
    target, with exactly the content written."""
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01bytes")
    atomic_write_text(tmp_path / "b.txt", "text, caf\u00e9\n")
    with atomic_path(tmp_path / "checkpoint") as staging:
        staging.mkdir()
        (staging / "state.json").write_text("{}")
    assert _folder_listing(tmp_path) == ["a.bin", "b.txt", "checkpoint"]
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01bytes"
    assert (tmp_path / "b.txt").read_bytes() == "text, caf\u00e9\n".encode("utf-8")
    assert _folder_listing(tmp_path / "checkpoint") == ["state.json"]
    atomic_write_bytes(tmp_path / "a.bin", b"replaced")  # replacing an existing file leaves nothing either
    assert _folder_listing(tmp_path) == ["a.bin", "b.txt", "checkpoint"]
    assert (tmp_path / "a.bin").read_bytes() == b"replaced"


def test_an_exception_inside_the_block_keeps_the_old_file_and_leaves_no_staging(tmp_path):
    """Guards a failed write (a validation error, a full disk) that replaces the target anyway or leaves
    its half-written staging file or folder behind: the old file stays byte for byte, a missing folder
    stays missing, and the folder holds nothing else."""
    target = tmp_path / "lora.safetensors"
    target.write_bytes(OLD)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as staging:
            staging.write_bytes(NEW_CHUNK)
            raise RuntimeError("disk full")
    assert target.read_bytes() == OLD
    with pytest.raises(RuntimeError, match="bad state"):
        with atomic_path(tmp_path / "checkpoint-2") as staging:
            staging.mkdir()
            (staging / "model.safetensors").write_bytes(NEW_CHUNK)
            raise RuntimeError("bad state")
    assert _folder_listing(tmp_path) == ["lora.safetensors"]


def test_a_staging_name_is_recognised_by_the_target_it_was_for(tmp_path):
    """Guards a folder's clean-up (the results store's sweep) missing what a writer killed mid-write left, or taking
    another file for it, once the staging name's format lives in one place: every `staging_path` name is one, of a
    target of its suffix only; a target, a hidden file and another writer's temporary file are not."""
    from slapgen.atomic import is_staging_name, staging_path

    staging = staging_path(tmp_path / "job-1.mp4").name
    assert is_staging_name(staging) and is_staging_name(staging, ".mp4") and not is_staging_name(staging, ".json")
    assert is_staging_name(staging_path(tmp_path / ".hidden.v2.mp4").name, ".mp4")
    for other in ("job-1.mp4", ".job-1.mp4", ".job-1.mp4.tmp", ".job-1.mp4.12.tmp", "job-1.mp4.12.34.tmp",
                  ".job-1.mp4.12.x.tmp", ".clip.a1b2c3d4.tmp"):
        assert not is_staging_name(other, ".mp4"), other
