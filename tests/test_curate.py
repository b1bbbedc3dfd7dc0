"""`slapgen curate` on a dataset with planted defects: exact flags, a clean selection, a report that renders."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from slapgen.video import write_mp4
from trainer.cli import main as cli_main
from trainer.curate.captions import check_caption
from trainer.datasets import read_dataset
from trainer.demo_data import write_demo_dataset

LOOP = "The man slaps the man. " * 15
REFUSAL = ("I'm sorry, but as an AI language model I cannot watch or analyse video files. If you describe what "
           "happens in the clip, for example who strikes, how the defender reacts and how the camera moves, I "
           "would be glad to help you write a detailed caption that follows your guidelines for length and style.")
SHORT = "Power slap: the striker in red swings his open hand and the palm lands on the cheek. Static wide camera."
EXTRA = (" Behind them the crowd rises, a referee in a black shirt watches closely from the side, coaches shout "
         "instructions, stage lights flicker across the padded table and sweat glistens on both athletes' "
         "shoulders as the round ends.")

EXPECTED = {
    "clip_000.mp4": [], "clip_001.mp4": [], "clip_002.mp4": [], "clip_003.mp4": [],
    "clip_004.mp4": ["caption_missing"],
    "clip_005.mp4": ["caption_too_short"],
    "clip_006.mp4": ["caption_too_long"],
    "clip_007.mp4": ["caption_garbage"],
    "clip_008.mp4": ["caption_garbage"],
    "clip_009.mp4": ["too_short"],
    "x_black.mp4": ["black"],
    "x_frozen.mp4": ["frozen"],
    "x_corrupt.mp4": ["corrupt"],
    "x_copy_of_000.mp4": ["duplicate"],
}


def _ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], check=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    data = root / "clips"
    write_demo_dataset(data, clips=10, seed=3)
    good = (data / "clip_000.txt").read_text()
    (data / "clip_004.txt").unlink()
    (data / "clip_005.txt").write_text(SHORT)
    (data / "clip_006.txt").write_text(good.strip() + EXTRA)
    (data / "clip_007.txt").write_text(LOOP)
    (data / "clip_008.txt").write_text(REFUSAL)
    _ffmpeg("-i", str(data / "clip_009.mp4"), "-frames:v", "10", str(root / "short.mp4"))
    shutil.move(root / "short.mp4", data / "clip_009.mp4")
    write_mp4(np.zeros((40, 144, 224, 3), np.float32), data / "x_black.mp4", fps=16)
    still = np.random.default_rng(0).uniform(0, 1, (144, 224, 3)).astype(np.float32)
    write_mp4(np.repeat(still[None], 40, axis=0), data / "x_frozen.mp4", fps=16)
    (data / "x_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not really a video" * 64)
    # Same footage, re-encoded at another size and quality.
    _ffmpeg("-i", str(data / "clip_000.mp4"), "-vf", "scale=320:206", "-c:v", "libx264", "-crf", "32",
            str(data / "x_copy_of_000.mp4"))
    for name in ("x_black", "x_frozen", "x_corrupt", "x_copy_of_000"):
        (data / f"{name}.txt").write_text(good)
    return data


@pytest.fixture(scope="module")
def curated(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated")
    code = cli_main(["curate", str(planted), "--out", str(out), "--select", "3", "--workers", "2",
                     "--config", "tiny-smoke"])
    assert code == 0
    return out


def test_planted_defects_get_exactly_the_right_flags(curated, planted):
    report = json.loads((curated / "report.json").read_text())
    flags = {clip["video"]: clip["issues"] for clip in report["clips"]}
    assert flags == EXPECTED
    by_name = {clip["video"]: clip for clip in report["clips"]}
    assert by_name["x_copy_of_000.mp4"]["duplicate_of"] == "clip_000.mp4"
    assert "refusal" in by_name["clip_008.mp4"]["caption"]["garbage_reasons"]
    assert "repetition loop" in by_name["clip_007.mp4"]["caption"]["garbage_reasons"]
    info = by_name["clip_000.mp4"]["video_info"]
    assert (info["width"], info["height"], info["frame_count"], info["fps"]) == (224, 144, 40, 16)
    assert info["duration_s"] == pytest.approx(2.5) and len(info["phash"]) == 8 * 64 * 2
    assert by_name["x_copy_of_000.mp4"]["video_info"]["width"] == 320
    assert report["summary"]["without_caption"] == 1 and report["summary"]["clips"] == len(EXPECTED)


def test_selection_avoids_every_flagged_clip_and_loads_in_the_trainer(curated, planted, tmp_path):
    selected = read_dataset(curated / "selected.jsonl")
    names = [clip.video.name for clip in selected]
    assert len(names) == 3 and len(set(names)) == 3
    assert set(names) <= {name for name, issues in EXPECTED.items() if not issues}
    assert all(clip.video.parent == planted for clip in selected)
    out = tmp_path / "all"
    assert cli_main(["curate", str(planted), "--out", str(out), "--select", "50", "--workers", "1", "--config", "tiny-smoke"]) == 0
    everything = [clip.video.name for clip in read_dataset(out / "selected.jsonl")]
    assert sorted(everything) == ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4", "clip_003.mp4"]  # never a flagged one


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []
        self.external = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        for key in ("src", "href"):
            if attrs.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(attrs[key])


def test_report_renders_offline_with_valid_images(curated):
    page = (curated / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert parser.external == [] and "<script" not in page
    plots = [s for s in parser.sources if s.startswith("plots/")]
    thumbnails = [s for s in parser.sources if s.startswith("thumbnails/")]
    assert {p.split("/")[1] for p in plots} == {"caption_lengths.png", "categories.png", "aspects.png", "scores.png"}
    assert len(thumbnails) == sum(1 for name, issues in EXPECTED.items() if issues and name != "x_corrupt.mp4")
    for source in parser.sources:
        with Image.open(curated / source) as image:
            image.verify()
            assert image.format == "PNG"
    assert "x_corrupt.mp4" in page and "without a caption yet" in page


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("qx7 zz9 ## 1234 5678 qwrt plk vbn mmm 0x3f " * 6, "mostly non-words"),
        ("Subscribe to our channel and hit the bell for more content every week, thanks for watching and see you "
         "next time in our newsletter with great deals and offers for all our loyal fans everywhere around the "
         "world who support us daily with likes and shares and comments.", "does not describe a video"),
    ],
)
def test_other_garbage_is_caught(caption, reason):
    report = check_caption(caption)
    assert "caption_garbage" in report.issues and reason in report.garbage_reasons


def test_categories_and_aspects_are_tagged():
    report = check_caption(
        "Slow-motion replay: the striker plants his feet and swings; the palm lands with a visible impact, "
        "the defender staggers and collapses, and the referee waves off the bout. Close-up camera."
    )
    assert {"replay-slow-motion", "strike", "stagger", "knockout", "referee"} <= set(report.categories)
    assert report.aspects == ["motion", "positioning", "impact", "camera"]


def test_bad_arguments_are_one_line_errors(planted, tmp_path, capsys):
    assert cli_main(["curate", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["curate", str(planted), "--out", str(tmp_path / "o"), "--select", "0"]) == 2
    assert "--select" in capsys.readouterr().err


def _small_dataset(demo_dataset, folder):
    folder.mkdir()
    for name in ("clip_000", "clip_001", "clip_002"):
        shutil.copy(demo_dataset / f"{name}.mp4", folder / f"{name}.mp4")
        shutil.copy(demo_dataset / f"{name}.txt", folder / f"{name}.txt")
    return folder


def _flags(out):
    return {clip["video"]: clip["issues"] for clip in json.loads((out / "report.json").read_text())["clips"]}


def test_undecodable_caption_is_flagged_and_curation_carries_on(demo_dataset, tmp_path):
    """Guards a caption file that is not UTF-8 crashing `slapgen curate` (UnicodeDecodeError): the clip
    is flagged `caption_unreadable` (not `caption_missing`), never selected, and the rest is curated."""
    data = _small_dataset(demo_dataset, tmp_path / "data")
    (data / "clip_001.txt").write_bytes((data / "clip_001.txt").read_bytes()[:40] + b"\xff\xfe\xfd")
    out = tmp_path / "out"
    assert cli_main(["curate", str(data), "--out", str(out), "--select", "3", "--workers", "1", "--config", "tiny-smoke"]) == 0
    assert _flags(out) == {"clip_000.mp4": [], "clip_001.mp4": ["caption_unreadable"], "clip_002.mp4": []}
    assert sorted(clip.video.name for clip in read_dataset(out / "selected.jsonl")) == ["clip_000.mp4", "clip_002.mp4"]
    assert "caption_unreadable" in (out / "report.html").read_text()


def test_curation_never_reads_through_a_link_out_of_the_dataset(demo_dataset, tmp_path):
    """Guards curation following symbolic links out of the dataset folder and putting the outside
    file's text in report.json / report.html: a caption or video that leads out is flagged
    (`caption_outside_dataset`, `outside_dataset`) and never read; a link inside the folder is
    followed, so it shows up as a `duplicate` of its target."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOPSECRET " * 60)
    shutil.copy(demo_dataset / "clip_003.mp4", outside / "clip.mp4")
    data = _small_dataset(demo_dataset, tmp_path / "data")
    (data / "clip_001.txt").unlink()
    (data / "clip_001.txt").symlink_to(outside / "secret.txt")
    (data / "z_outside.mp4").symlink_to(outside / "clip.mp4")
    shutil.copy(demo_dataset / "clip_003.txt", data / "z_outside.txt")
    (data / "z_inside.mp4").symlink_to("clip_000.mp4")
    shutil.copy(demo_dataset / "clip_003.txt", data / "z_inside.txt")
    out = tmp_path / "out"
    assert cli_main(["curate", str(data), "--out", str(out), "--select", "5", "--workers", "1", "--config", "tiny-smoke"]) == 0
    assert _flags(out) == {"clip_000.mp4": [], "clip_001.mp4": ["caption_outside_dataset"], "clip_002.mp4": [],
                           "z_inside.mp4": ["duplicate"], "z_outside.mp4": ["outside_dataset"]}
    for name in ("report.json", "report.html", "selected.jsonl"):
        assert "TOPSECRET" not in (out / name).read_text()
    outside_record = next(c for c in json.loads((out / "report.json").read_text())["clips"] if c["video"] == "z_outside.mp4")
    assert outside_record["video_info"]["error"] == "not read: a link out of the dataset folder"
