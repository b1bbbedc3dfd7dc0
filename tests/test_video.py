import sys

import numpy as np
import pytest

from slapgen.video import read_mp4, write_mp4


def test_mp4_round_trip_keeps_count_size_and_fps(tmp_path):
    rng = np.random.default_rng(0)
    # Smooth content survives H.264 well enough to compare means.
    frames = np.broadcast_to(np.linspace(0, 1, 7)[:, None, None, None], (7, 32, 48, 3)).copy()
    frames += rng.uniform(-0.02, 0.02, frames.shape)
    path = write_mp4(np.clip(frames, 0, 1), tmp_path / "clip.mp4", fps=8)
    decoded, fps = read_mp4(path)
    assert decoded.shape == (7, 32, 48, 3) and decoded.dtype == np.uint8
    assert fps == pytest.approx(8)
    assert np.abs(decoded.mean(axis=(1, 2, 3)) / 255 - frames.mean(axis=(1, 2, 3))).max() < 0.05


@pytest.mark.parametrize("fps, shape", [(8, (9, 64, 96, 3)), (16, (5, 32, 48, 3))])
def test_an_mp4_is_the_file_diffusers_export_to_video_writes(fps, shape, tmp_path):
    """Guards `write_mp4` (imageio's writer called directly, so that writing a video imports no diffusers) drifting
    from the file diffusers' `export_to_video` writes: another quality, bitrate or block size, or rounding frames
    where diffusers truncates them (values a hair under a level, such as 0.999, tell the two apart). The two files
    are equal byte for byte."""
    from diffusers.utils import export_to_video

    rng = np.random.default_rng(fps)
    frames = rng.uniform(0, 1, shape)
    frames[0, 0, :8] = 0.999  # truncated to 254, rounded to 255
    ours = write_mp4(frames, tmp_path / "ours.mp4", fps=fps)
    theirs = export_to_video(list(frames), str(tmp_path / "theirs.mp4"), fps=fps)
    assert ours.read_bytes() == (tmp_path / "theirs.mp4").read_bytes() and theirs == str(tmp_path / "theirs.mp4")


def test_writing_an_mp4_imports_no_diffusers(tmp_path):
    """Guards the import that made every `slapgen demo-data` spend 3 of its 4 seconds importing diffusers (and
    torch, torch's compiler) to reach `export_to_video`: a process that writes an mp4 without a pipeline has
    imported neither."""
    import subprocess

    script = ("import sys, numpy as np; from pathlib import Path; from slapgen.video import write_mp4; "
              f"write_mp4(np.zeros((3, 32, 32, 3)), Path({str(tmp_path / 'x.mp4')!r}), fps=8); "
              "print(sorted(name for name in ('diffusers', 'torch') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]"] and (tmp_path / "x.mp4").stat().st_size > 0


def test_write_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="F, H, W, 3"):
        write_mp4(np.zeros((4, 32, 32)), tmp_path / "x.mp4", fps=8)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the encoder's signal mask from /proc")
def test_an_encoder_sent_sigterm_as_a_server_stops_still_writes_the_whole_video(tmp_path, monkeypatch):
    """Guards a job failing with "Broken pipe" when its server stops gracefully: BentoML's process manager sends
    its SIGTERM to the worker's children too (circus, `stop_children=True`), so the ffmpeg encoding the job's mp4
    died under it. Here every ffmpeg is sent SIGTERM the moment it starts, while a job's thread (not the main
    one) writes a video: the real ffmpeg must hold SIGTERM blocked (/proc's SigBlk) and finish the whole mp4,
    and the thread's own signal mask must be as it was."""
    import signal
    import subprocess
    import threading

    started = []

    class SignalledAtStart(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            super().__init__(args, *rest, **kwargs)
            if "ffmpeg" in str(args[0]):
                blocked = next(line for line in open(f"/proc/{self.pid}/status") if line.startswith("SigBlk:"))
                started.append(int(blocked.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
                self.send_signal(signal.SIGTERM)  # what a server's stop sends the worker's children

    monkeypatch.setattr(subprocess, "Popen", SignalledAtStart)
    frames = np.broadcast_to(np.linspace(0, 1, 9)[:, None, None, None], (9, 32, 48, 3)).copy()
    outcome = {}

    def job():
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        try:
            outcome["path"] = write_mp4(frames, tmp_path / "job.mp4", fps=8)
        except Exception as error:  # reported below, with what the thread saw
            outcome["error"] = error
        outcome["mask_restored"] = signal.pthread_sigmask(signal.SIG_BLOCK, []) == before

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert started == [1]  # one ffmpeg, SIGTERM blocked in it
    assert outcome["mask_restored"]
    monkeypatch.undo()  # the decoder below is started as usual
    decoded, _ = read_mp4(outcome["path"])
    assert decoded.shape == (9, 32, 48, 3)


@pytest.mark.parametrize("index_first", [False, True])
def test_every_cut_of_an_mp4_is_refused_and_the_whole_one_passes(index_first, tmp_path):
    """Guards `check_written_whole` taking a cut mp4 for whole (what a full disk leaves), or refusing a whole one: every
    prefix of a real mp4, cut at each of 64 places and just before its end, is refused naming the video; the whole
    file passes, with ffmpeg's index (`moov`) last, as `write_mp4` writes it, or first (`+faststart`, as a user's
    re-encoded upload may be). ffmpeg itself decodes the whole file (positive control)."""
    import imageio_ffmpeg

    from slapgen.video import check_written_whole

    frames = (np.random.default_rng(0).random((9, 32, 48, 3)) * 255).astype(np.uint8)
    path = tmp_path / "whole.mp4"
    writer = imageio_ffmpeg.write_frames(str(path), (48, 32), fps=8, macro_block_size=16,
                                         output_params=["-movflags", "+faststart"] if index_first else [])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    data = path.read_bytes()
    assert (data.find(b"moov") < data.find(b"mdat")) is index_first
    assert len(list(imageio_ffmpeg.read_frames(str(path)))) == 1 + len(frames)  # its metadata, then every frame
    check_written_whole(path, path)
    cut = tmp_path / "cut.mp4"
    for length in sorted({*range(0, len(data), max(1, len(data) // 64)), len(data) - 1}):
        cut.write_bytes(data[:length])
        with pytest.raises(OSError, match="could not write it whole") as refused:
            check_written_whole(cut, tmp_path / "named.mp4")
        assert refused.value.filename == str(tmp_path / "named.mp4"), length
