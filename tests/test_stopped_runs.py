"""Runs stopped by what is outside them: another run in the same folder, a disk that fills, a line cut off."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, cli_stderr, offline_env, tiny_train_overrides
from trainer.metrics import truncate_after
from trainer.run_folder import last_logged_step


def test_a_line_cut_off_mid_write_is_dropped_on_resume(tmp_path):
    """Guards a resume stopped for good by `json.decoder.JSONDecodeError`: a full disk (or a kill) mid-append left
    metrics.jsonl ending in `{"step": 53, "loss": 1.0`, and truncate_after parsed every line. Whole lines up to
    the checkpoint's step stay, byte for byte; the cut line and later steps go."""
    path = tmp_path / "metrics.jsonl"
    whole = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    path.write_text("\n".join(whole) + '\n{"step": 6, "loss": 1.0')
    assert last_logged_step(tmp_path) == 5
    truncate_after(path, 3)
    assert path.read_text() == "\n".join(whole[:3]) + "\n"
    path.write_text("\n".join(whole) + '\n["not", "a", "record"]\n{"step": "7"}\n')
    truncate_after(path, 10)
    assert path.read_text() == "\n".join(whole) + "\n"


def test_a_write_that_does_not_fit_ends_in_one_line_and_leaves_no_part_file(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards a full disk (or a file-size limit: FAT32's 4 GiB, `ulimit -f`) while caching latents ending in
    safetensors' `SafetensorError: Error while serializing: I/O error`, a traceback that names no file. A real
    `slapgen precompute` under a 2,000-byte file-size limit (the kernel refuses the cache entry's write: EFBIG)
    says in one line which file, why, and what to do, and leaves no staging file behind."""
    cache = tmp_path / "cache"

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    result = subprocess.run([sys.executable, "-m", "trainer", "precompute", str(demo_dataset), "--model", "tiny",
                             "--config", "tiny-smoke", "--out", str(cache)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, preexec_fn=limited,
                            env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir), TQDM_DISABLE="1"))
    assert result.returncode == 2, result.stderr[-3000:]
    message = cli_stderr(result.stderr).splitlines()[-1]
    assert message.startswith(f"slapgen precompute: cannot write {cache / 'clips'}/")
    assert message.endswith(".safetensors: File too large; write where larger files fit (FAT32 stops at 4 GiB; "
                            "`ulimit -f` sets a limit too), then run the same command again")
    assert not [path for path in cache.rglob("*") if path.name.endswith(".tmp")]


@pytest.mark.slow
def test_a_second_training_into_a_running_runs_folder_is_refused(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards two `slapgen train` into one folder: both ran, metrics.jsonl held every step twice and config.yaml
    disagreed with the LoRA's metadata; with --overwrite the second deleted the running run's files under it
    (its TensorBoard writer died on FileNotFoundError). The second start is refused in one line and changes
    nothing; the lock goes with the first run's process, however it ends (here SIGKILL)."""
    from trainer.folder_lock import FolderLock
    from trainer.run_folder import TRAIN_LOCK

    run = tmp_path / "run"
    args = ["train", "--config", "tiny-smoke", "--data", str(demo_dataset), "--out", str(run)]
    for item in tiny_train_overrides(tiny_cache_dir, "train.max_train_steps=5000", "checkpoint.every_steps=2"):
        args += ["--set", item]
    env = offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir))
    first = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(run.glob("checkpoints/*/trainer_state.json")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        for extra in ([], ["--overwrite"]):  # the lock comes before anything a start reads (--resume's checkpoint)
            second = subprocess.run([sys.executable, "-m", "trainer", *args, *extra], cwd=REPO_ROOT, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert (second.returncode, cli_stderr(second.stderr)) == (
                2, f"slapgen train: another slapgen train is running in {run}; wait for it or stop it, or train into "
                   "another --out"), extra
        assert first.poll() is None and list(run.glob("checkpoints/*"))  # the first run trains on, its files there
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with FolderLock(run, TRAIN_LOCK, lambda folder: AssertionError(f"{folder} still locked")):
        pass


def test_a_look_at_the_run_folders_lock_refuses_while_held_and_changes_nothing(tmp_path):
    """Guards `slapgen train`'s look at the lock before its imports (`FolderLock.check_free`): it must refuse while
    another holds the lock, make nothing where there is no run folder (a refused or checked start changes nothing),
    and leave the holder holding it (a look that took the lock away, or kept it, would let a second training in or
    refuse the first's own next start)."""
    from trainer.errors import TrainError
    from trainer.run_folder import train_lock

    run = tmp_path / "run"
    train_lock(run).check_free()
    assert not run.exists()
    with train_lock(run):  # held through another open of the file: flock locks conflict across opens
        for _ in range(2):
            with pytest.raises(TrainError, match=f"another slapgen train is running in {run};"):
                train_lock(run).check_free()
        with pytest.raises(TrainError):  # still held after the looks
            with train_lock(run):
                pass
    train_lock(run).check_free()
    with train_lock(run):  # free again once the holder let go
        pass


def test_which_signals_ask_training_to_stop():
    """Guards training stopping on a SIGINT its process was started ignoring (a shell's background job, `cmd &`,
    gets SIGINT ignored, and a Ctrl-C meant for the foreground stopped the job's training though not its encoding),
    and training taking a SIGTERM its host handles (a Ray worker's handler ends the worker so that Ray runs the cell
    again): an ignored SIGINT stays ignored inside `StopOnInterrupt`, a SIGTERM with a handler keeps it; one at its
    default asks the run to stop and is remembered (the exit status). A second SIGINT stops at once, a SIGTERM
    after a stop was asked does nothing more (its sender kills when its grace ends)."""
    import os

    from trainer.interrupt import StopOnInterrupt

    def send(signum: int) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)

    def host_handler(signum, frame):
        got.append(signum)

    got = []
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, host_handler)
        with StopOnInterrupt() as ignored:
            send(signal.SIGINT)
            send(signal.SIGTERM)
        assert not ignored.requested and got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is host_handler

        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with StopOnInterrupt() as terminated:
            send(signal.SIGTERM)
            assert terminated.signal == signal.SIGTERM
            send(signal.SIGTERM)  # nothing more
            with pytest.raises(KeyboardInterrupt):
                send(signal.SIGINT)
        with StopOnInterrupt() as interrupted:
            send(signal.SIGINT)
            assert interrupted.signal == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                send(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_sigterm_stops_a_block_of_a_driver_as_ctrl_c_does():
    """Guards the one rule of the sweep's pool and the Ray driver (`SigtermStops`): SIGTERM at its default raises
    `StopRequested(SIGTERM)` in the block (the block's stop runs: each run checkpoints its step) and is put back
    after; a host's handler stays unless the block may replace any (a driver over ray.init's, which exits at once);
    a plain KeyboardInterrupt (Ray's wait turns the raise into one) becomes `StopRequested(SIGTERM)` once a SIGTERM
    came, and stays a Ctrl-C otherwise; `ignore_more()` ignores a second SIGTERM while the stop is carried out."""
    import os

    from trainer.interrupt import SigtermStops, StopRequested

    def send() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)

    def host_handler(signum, frame):
        got.append(signum)

    got = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with SigtermStops() as sigterm:
            with pytest.raises(StopRequested) as stopped:
                send()
            assert stopped.value.signum == signal.SIGTERM and sigterm.came
            sigterm.ignore_more()
            send()  # nothing
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        signal.signal(signal.SIGTERM, host_handler)
        with SigtermStops() as sigterm:
            send()
        assert got == [signal.SIGTERM] and not sigterm.came and signal.getsignal(signal.SIGTERM) is host_handler
        with SigtermStops(replaces=lambda handler: True) as sigterm:
            with pytest.raises(StopRequested):
                send()
            interrupt = KeyboardInterrupt()  # as Ray's wait hands the raise on
            assert isinstance(sigterm.stop_of(interrupt), StopRequested)
            assert sigterm.stop_of(interrupt).signum == signal.SIGTERM
        assert got == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is host_handler
        with SigtermStops(replaces=lambda handler: True) as sigterm:
            ctrl_c = KeyboardInterrupt()
            assert sigterm.stop_of(ctrl_c) is ctrl_c
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_video_that_could_not_be_written_whole_is_not_published(tmp_path):
    """Guards `write_mp4_atomic` publishing a cut mp4 as whole: the encoder ends without a word when its output does
    not fit (here a 2,000-byte file-size limit, which a full disk acts like), and the 2,000 bytes it left ("moov atom
    not found") were renamed into place, where a resume took a validation video for made. Now an OSError names the
    video and nothing is left; without the limit the same call writes it."""
    script = ("import resource, sys\nfrom pathlib import Path\nimport numpy as np\n"
              "from slapgen.video import write_mp4_atomic\n"
              "if sys.argv[2] == 'limited':\n    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n"
              "try:\n    write_mp4_atomic(np.random.default_rng(0).random((9, 64, 96, 3)), Path(sys.argv[1]), 8)\n"
              "except OSError as error:\n    print('OSError', error.errno, error.filename)\n"
              "print(sorted(path.name for path in Path(sys.argv[1]).parent.iterdir()))\n")
    for folder, mode in ((tmp_path / "limited", "limited"), (tmp_path / "free", "free")):
        folder.mkdir()
        result = subprocess.run([sys.executable, "-c", script, str(folder / "video.mp4"), mode], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120)
        expected = (f"OSError 5 {folder / 'video.mp4'}\n[]\n" if mode == "limited" else "['video.mp4']\n")
        assert result.stdout == expected, result.stderr[-2000:]


@pytest.mark.parametrize("variables, first", [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False),
                                              ({"PMI_RANK": "1"}, False), ({"OMPI_COMM_WORLD_RANK": "2"}, False)])
def test_the_run_folders_lock_is_the_first_processs_alone(variables, first, monkeypatch):
    """Guards every process of a CPU launch taking the run folder's lock (a PartialState made before the
    Accelerator took each for the main one, and the second was refused: "another slapgen train is running"), and an
    MPI launch, which sets no RANK, reading every process as the first. The rank is read as accelerate reads it
    (`get_int_from_env`, the reference: slapgen reads it without accelerate, before torch is imported)."""
    from accelerate.utils import get_int_from_env

    from trainer.run_folder import RANK_VARIABLES, first_process

    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert first_process() is first
    assert first_process() is (get_int_from_env(list(RANK_VARIABLES), 0) == 0)


FULL_DISK_IN_THE_SERVICE = r"""
import errno, json, resource, sys
from pathlib import Path
from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.errors import VideoNotWrittenError
from slapgen.models.loading import resolve_model
from slapgen.serving.http_errors import error_response, status_for
from slapgen.serving.results import ResultStore

folder = Path(sys.argv[1])
generator = VideoGenerator.load(resolve_model("tiny", Path(sys.argv[2])), EngineOptions(adapters_dir=folder / "adapters"))
params = GenerationParams.defaults_for(generator.spec, seed=1, prompt="a palm strikes a cheek")
free = generator.generate_mp4(params, folder / "free.mp4")
results = ResultStore(folder / "results")
results.save("free", free.read_bytes())
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # a disk that fills 2,000 bytes into a file
answers = {"free_bytes": free.stat().st_size}
for name, write in (("generate", lambda: generator.generate_mp4(params, folder / "limited.mp4")),
                    ("job_result", lambda: results.save("limited", free.read_bytes()))):
    try:
        write()
        answers[name] = "written"
    except OSError as error:  # what the service's routes turn into their answer (service._not_written)
        answered = VideoNotWrittenError.of(error)
        answers[name] = [error.errno, error.filename, status_for(answered), json.loads(error_response(answered).body)["error"]]
answers["permission"] = VideoNotWrittenError.of(PermissionError(errno.EACCES, "Permission denied", "x.mp4"))
print(json.dumps(answers))
"""


def test_a_service_that_cannot_write_a_video_says_so_instead_of_sending_a_cut_mp4(tiny_cache_dir, tmp_path):
    """Guards the service answering a full disk with a cut mp4: the encoder ends without a word when its output does
    not fit, `/generate` sent the 2,000 bytes it left as a 200 (a video no player opens), and a job's result that did
    not fit was a 500 whose message named the disk's staging file. The tiny model's engine, as the service runs it,
    under a 2,000-byte file-size limit (how a full disk acts) after a free generation: both writes raise an OSError
    naming the file, which the service answers as a 507 in the one error shape saying what happened and what to do;
    an OSError that is no want of space (a permission) is left to be the server's 500."""
    result = subprocess.run([sys.executable, "-c", FULL_DISK_IN_THE_SERVICE, str(tmp_path), str(tiny_cache_dir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=offline_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["free_bytes"] > 2000  # so the limit cuts it
    assert answers["generate"] == [5, str(tmp_path / "limited.mp4"), 507, (
        "the server could not write the video it made (the encoder could not write it whole: a full disk, or a "
        "file-size limit?); nothing is kept: send it again once the server's operator has freed space")]
    assert answers["job_result"] == [27, str(tmp_path / "results" / "limited.mp4"), 507, (
        "the server could not write the video it made (File too large); nothing is kept: send it again once the "
        "server's operator has freed space")]
    assert answers["permission"] is None
    assert sorted(path.name for path in (tmp_path / "results").iterdir()) == ["free.mp4"]
