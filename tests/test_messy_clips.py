"""Clips as users' folders hold them: variable frame rates, downloads cut short, audio-only files, links to
nothing, links to folders, captions without a video, and a curate folder used twice."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import pytest

from tests.conftest import REPO_ROOT
from trainer.cli import main as cli_main
from trainer.curate.video_probe import probe_video
from trainer.datasets import read_dataset
from trainer.errors import ClipError, DatasetError
from trainer.frames import load_clip

# The test clip's brightness grows with time, so each frame says when it was shot: its RGB value is SLOPE * seconds
# (steep enough that frames 1/30 s apart are not frozen, FROZEN_MAX_DIFF).
SLOPE = 200


def _ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], check=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("messy")
    # Studio-range luma (16 is black, 235 white), which decodes to RGB (Y - 16) * 255 / 219.
    ramp = f"color=c=black:s=64x48:r=30:d=1.25,format=yuv420p,geq=lum='16+219/255*{SLOPE}*T':cb=128:cr=128"
    # Variable frame rate, as phones record: every frame of the first 20 (30 fps), then every 4th (7.5 fps).
    _ffmpeg("-f", "lavfi", "-i", ramp, "-vf", r"select='lt(n\,20)+not(mod(n\,4))'", "-fps_mode", "vfr",
            "-c:v", "libx264", "-qp", "0", str(folder / "vfr.mp4"))
    source = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30:duration=3"]
    _ffmpeg(*source, "-f", "lavfi", "-i", "sine=duration=3", "-c:v", "libx264", "-c:a", "aac", "-movflags",
            "+faststart", str(folder / "whole.mp4"))
    whole = (folder / "whole.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(whole[:len(whole) // 2])  # a download cut short: the index says 3 s
    _ffmpeg(*source, "-f", "lavfi", "-i", "sine=duration=4.5", "-c:v", "libx264", "-c:a", "aac",
            str(folder / "long_audio.mp4"))  # 3 s of video, 4.5 s of sound: whole, not cut
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac", str(folder / "audio_only.mp4"))
    for name in ("whole", "long_audio"):  # bytes damaged mid-file, its length and index whole
        data = bytearray((folder / f"{name}.mp4").read_bytes())
        for index in range(len(data) // 2, len(data) // 2 + 400, 7):
            data[index] ^= 0xFF
        (folder / f"{name}_damaged.mp4").write_bytes(bytes(data))
    # A phone's portrait clip: stored 160x120, with a rotation to show it upright
    _ffmpeg("-display_rotation", "90", "-i", str(folder / "long_audio.mp4"), "-c", "copy", str(folder / "rotated.mp4"))
    return folder


def test_a_variable_frame_rate_clip_is_sampled_at_the_instants_it_was_shot(clips):
    """Guards variable-frame-rate clips trained slowed down: ffmpeg filled the clip to its nominal 30 fps with
    copies while the trainer read it at the 20 fps average the header reports, so frame k of the training
    clip came from k / 12 s instead of k / 8 s (the 1.0 s frame from 0.67 s). Each frame's brightness says
    when it was shot: the nearest frame of the sparse part is at most 1/15 s away, and the resampling to the
    average rate and the trainer's rounding to its frames add at most 1/20 s."""
    video = load_clip(clips / "vfr.mp4", num_frames=9, fps=8, height=48, width=64)
    shot_at = ((video.mean(dim=(1, 2, 3)) + 1) * 127.5 / SLOPE).tolist()
    assert shot_at == pytest.approx([k / 8 for k in range(9)], abs=1 / 15 + 1 / 20)


def test_the_probe_counts_a_variable_frame_rate_clip_by_its_own_frames(clips):
    """Guards curate's probe reading the copies ffmpeg fills a variable-frame-rate clip with as footage: 37
    frames, 1.8 s (at the average rate) and a third of them frozen, where the clip holds 25 frames over 1.25 s."""
    probe = probe_video(clips / "vfr.mp4")
    assert probe.readable and probe.frame_count == 25  # frames 0-19, then 20, 24, ... 36
    assert probe.duration_s == pytest.approx(1.25, abs=0.1)
    assert probe.frozen_fraction == 0.0


@pytest.mark.parametrize("name, stated", [("cut", "3.00"), ("whole_damaged", "3.00"), ("long_audio_damaged", "4.50")])
def test_a_download_cut_short_or_damaged_is_corrupt_and_a_longer_soundtrack_is_not(clips, name, stated):
    """Guards a half-downloaded mp4 (its index at the front, so its header says 3 s) passing curate as a clean
    1.4 s clip, and bytes damaged mid-clip passing as clean footage (ffmpeg conceals them into frames): the
    decoding stops at the first error, short of what the file states, and the error is said. A clip whose audio
    outlasts its video is also short of the file's length, but decodes cleanly, so it stays; so does the
    whole clip."""
    probe = probe_video(clips / f"{name}.mp4")
    assert not probe.readable
    assert re.fullmatch(rf"its video stops at [0-2]\.\d\d s of the {stated} s the file states, on a decoding error "
                        r"\(cut short, or damaged: [^\[\]]+\)", probe.error), probe.error
    long_audio = probe_video(clips / "long_audio.mp4")
    assert long_audio.readable and long_audio.duration_s == pytest.approx(3.0)
    assert probe_video(clips / "whole.mp4").readable


def test_a_file_with_no_video_stream_says_so(clips):
    """Guards an audio-only .mp4 being reported with ffmpeg's last line, "Error opening output files: Invalid
    argument", in curate and training alike."""
    assert probe_video(clips / "audio_only.mp4").error == "no video stream"
    with pytest.raises(ClipError, match=r"audio_only.mp4 cannot be decoded \(no video stream\)"):
        load_clip(clips / "audio_only.mp4", num_frames=9, fps=8, height=48, width=64)


def test_a_clip_whose_frames_all_fail_to_decode_is_corrupt_in_training_as_in_curate(demo_dataset, tmp_path):
    """Guards a damaged clip that ffmpeg opens and ends on without an error or a frame (its first frame's bytes
    zeroed) being called too short in training ("has 0 frames at 8 fps; 1.00s are needed") while curate called it
    corrupt: a walk-through's summary read "17 corrupt, 8 too_short" for 25 damaged files. The whole clip loads."""
    data = (demo_dataset / "clip_000.mp4").read_bytes()
    start = data.index(b"mdat") + 4
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(data[:start] + bytes(1000) + data[start + 1000:])
    assert not probe_video(damaged).readable  # curate's word
    with pytest.raises(ClipError) as error:
        load_clip(damaged, num_frames=9, fps=8, height=48, width=64)
    assert (error.value.reason, str(error.value)) == (
        "corrupt", "damaged.mp4: not one frame of its video could be decoded (damaged?)")
    assert load_clip(demo_dataset / "clip_000.mp4", num_frames=9, fps=8, height=48, width=64).shape == (9, 3, 48, 64)


@pytest.fixture
def messy_folder(demo_dataset, tmp_path):
    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    for name in ("clip_000", "clip_001"):
        shutil.copy(demo_dataset / f"{name}.mp4", data / f"{name}.mp4")
        shutil.copy(demo_dataset / f"{name}.txt", data / f"{name}.txt")
    shutil.copy(demo_dataset / "clip_002.mp4", data / "real" / "clip_002.mp4")
    shutil.copy(demo_dataset / "clip_002.txt", data / "real" / "clip_002.txt")
    (data / "linked").symlink_to("real")  # a link to a folder: not walked
    (data / "gone.mp4").symlink_to("missing.mp4")  # a link to nothing
    shutil.copy(demo_dataset / "clip_003.txt", data / "gone.txt")
    shutil.copy(demo_dataset / "clip_003.txt", data / "orphan.txt")  # a caption with no video
    return data


def test_every_entry_of_a_folder_is_reported_or_named(messy_folder, tmp_path, capsys):
    """Guards entries a folder dataset passed over in silence: a link to a missing file (neither curated nor
    counted), a link to a folder (not walked) and a caption with no video beside it. The link to nothing is a
    clip curate flags and training names; the other two are listed in the report as not read, and said. Clips
    that run well past what training reads from their start are counted and said."""
    out = tmp_path / "out"
    assert cli_main(["curate", str(messy_folder), "--out", str(out), "--workers", "1", "--config", "tiny-smoke"]) == 0
    report = json.loads((out / "report.json").read_text())
    flags = {clip["video"]: clip["issues"] for clip in report["clips"]}
    assert flags == {"clip_000.mp4": [], "clip_001.mp4": [], "gone.mp4": ["corrupt"], "real/clip_002.mp4": []}
    gone = next(clip for clip in report["clips"] if clip["video"] == "gone.mp4")
    assert gone["video_info"]["error"] == "file not found"
    assert [entry["path"] for entry in report["not_read"]] == ["linked/", "orphan.txt"]
    assert "a caption with no video beside it" in report["not_read"][1]["why"]
    assert "orphan.txt" in (out / "report.html").read_text()
    printed = capsys.readouterr().out
    assert "4 clips: 3 clean, 1 flagged" in printed
    # tiny-smoke trains 9 frames at 8 fps, 1 s from each clip's start; the demo clips run 2.5 s (a walk-through's
    # 40 s clip gave 1 s, and nothing said so)
    assert (report["summary"]["trained_seconds"], report["summary"]["longer_than_trained"]) == (1.0, 3)
    assert ("  3 clean clips run more than twice the 1 s training reads from a clip's start; the rest of each is "
            "never trained") in printed
    assert "  corrupt: 1: gone.mp4\n" in printed
    assert "  not read: 2 (linked/, orphan.txt): a link to a folder, not followed" in printed
    with pytest.raises(DatasetError, match=r"gone.mp4 not found \(looked in .*missing.mp4\)"):
        read_dataset(messy_folder)


def test_a_second_curate_into_a_folder_leaves_nothing_of_the_first(messy_folder, demo_dataset, tmp_path, capsys):
    """Guards a rerun of curate into the same --out keeping the first run's selected.jsonl (of another
    dataset: `train --data OUT/selected.jsonl` trained on it) and thumbnails of clips no longer there."""
    out = tmp_path / "out"
    assert cli_main(["curate", str(messy_folder), "--out", str(out), "--select", "2", "--workers", "1",
                     "--config", "tiny-smoke"]) == 0
    assert len(read_dataset(out / "selected.jsonl")) == 2
    first_thumbnails = sorted(path.name for path in (out / "thumbnails").iterdir())
    assert len(first_thumbnails) == 3  # the three readable clips
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(demo_dataset / "clip_003.mp4", other / "clip_003.mp4")
    shutil.copy(demo_dataset / "clip_003.txt", other / "clip_003.txt")
    (other / "clip_004.mp4").write_bytes(b"not a video")  # second, where the first run's second clip was readable
    capsys.readouterr()
    assert cli_main(["curate", str(other), "--out", str(out), "--workers", "1", "--config", "tiny-smoke",
                     "--set", "data.num_frames=17"]) == 0  # 2 s trained of its 2.5 s: not said
    assert not (out / "selected.jsonl").exists()
    assert sorted(path.name for path in (out / "thumbnails").iterdir()) == ["000000.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["removed_from_earlier_run"] == ["selected.jsonl", "2 thumbnails"]
    printed = capsys.readouterr().out
    assert f"removed what an earlier curate left in {out}: selected.jsonl, 2 thumbnails" in printed
    assert "training reads from a clip's start" not in printed
    assert "2 clips, 1 clean" in (out / "report.html").read_text()


def test_a_rotated_phone_clip_is_measured_upright_and_read_without_a_warning(clips):
    """Guards a portrait phone clip (stored landscape with a rotation) reported by curate at its stored 160x120,
    and imageio-ffmpeg's warning about its turned frames ("The frame size for reading (120, 160) is different
    from the source frame size (160, 120)"), naming no clip, in the middle of training's output."""
    probe = probe_video(clips / "rotated.mp4")
    assert (probe.width, probe.height) == (120, 160)
    # In a process of its own, as `slapgen precompute` reads clips (curate's probe, imported here, quiets it too)
    read = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from trainer.frames import "
                           "load_clip; print(tuple(load_clip(Path(sys.argv[1]), 9, 8, 64, 48).shape))",
                           str(clips / "rotated.mp4")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert (read.returncode, read.stdout, read.stderr) == (0, "(9, 3, 64, 48)\n", "")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text()
        except OSError:
            continue
        if int(fields[fields.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return "State:\tZ" not in (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_curates_workers_die_with_it(demo_dataset, tmp_path):
    """Guards a curate killed with SIGKILL leaving its probe workers alive for good (a crash attacker found one
    at 263 MB, 43 s later, in 3 of 4 kills): each inherits its siblings' ends of the task queue, so the queue
    never reads as closed. They now die with their parent."""
    data = tmp_path / "data"
    data.mkdir()
    for index in range(60):  # enough to be probing when the kill comes
        shutil.copy(demo_dataset / "clip_000.mp4", data / f"clip_{index:03d}.mp4")
    curate = subprocess.Popen([sys.executable, "-m", "trainer", "curate", str(data), "--out", str(tmp_path / "out"),
                               "--workers", "2", "--config", "tiny-smoke"], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(workers := [pid for pid in _children(curate.pid) if _running(pid)]) < 2:
            assert curate.poll() is None and time.monotonic() < deadline, "curate ended before its workers were seen"
            time.sleep(0.05)
    finally:
        curate.kill()
        curate.wait()
    deadline = time.monotonic() + 20
    while [pid for pid in workers if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in workers if _running(pid)] == []


@pytest.mark.parametrize("version, option", [("n9.0.2-17-g2a571b6068-20260930", "-fps_mode"), ("5.1.6-0+deb12u1", "-fps_mode"),
                                             ("4.4.2-0ubuntu0.22.04.1", "-vsync"), ("5.0.1", "-vsync"),
                                             ("N-112233-gabcdef", "-fps_mode")])
def test_the_probe_asks_each_ffmpeg_for_every_frame_in_its_own_words(version, option, monkeypatch):
    """Guards an older ffmpeg (IMAGEIO_FFMPEG_EXE: Ubuntu 22.04's 4.4) refusing `-fps_mode`, which it does not know,
    so every clip read as corrupt: before 5.1 the option is `-vsync` (which 7.0 dropped)."""
    import imageio_ffmpeg

    from trainer.curate.video_probe import passthrough_option

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_version", lambda: version)
    passthrough_option.cache_clear()
    try:
        assert passthrough_option() == [option, "passthrough"]
    finally:
        passthrough_option.cache_clear()
