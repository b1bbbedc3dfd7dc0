"""`slapgen curate` on a dataset with planted defects: exact flags, a clean selection, a report that renders."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from slapgen.video import write_mp4
from trainer.cli import main as cli_main
from trainer.curate.captions import check_caption
from trainer.datasets import read_dataset
from trainer.errors import DatasetError
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
    # 8 hashed frames per second of 16 fps footage: every other frame of the 40.
    assert info["duration_s"] == pytest.approx(2.5) and info["hashed_frames"] == 20
    assert info["content_box"] == [0, 102, 0, 160]  # 224x144 probed at 160x102, no bars to crop
    assert by_name["x_copy_of_000.mp4"]["video_info"]["width"] == 320
    relation = by_name["x_copy_of_000.mp4"]["duplicate"]
    assert (relation["of"], relation["kind"], relation["mirrored"], relation["speed"]) == ("clip_000.mp4", "same footage", False, 1.0)
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
    # A folder without clips: one sentence, and no empty OUT/thumbnails left behind (it was).
    (tmp_path / "empty").mkdir()
    assert cli_main(["curate", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no clips" in capsys.readouterr().err and not (tmp_path / "o").exists()


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


@pytest.fixture(scope="module")
def relatives(tmp_path_factory):
    """clip_000 (2.5 s) and footage derived from it the ways highlight reels reuse a broadcast, plus a
    hard negative: the same athletes, colours, backdrop and camera with other motion."""
    from dataclasses import replace

    from trainer.demo_data import FPS, SECONDS, DemoClip, caption_for, render_frame

    data = tmp_path_factory.mktemp("relatives")
    scene = DemoClip(striker_on_left=True, striker_colour="red", defender_colour="blue", outcome="staggers",
                     camera="pan", backdrop=0.3)
    count = int(FPS * SECONDS)
    write_mp4(np.stack([render_frame(scene, i / (count - 1)) for i in range(count)]), data / "clip_000.mp4", fps=FPS)
    other = replace(scene, impact=0.68, spacing=46.0, reach=30.0, outcome="knockout")
    write_mp4(np.stack([render_frame(other, i / (count - 1)) for i in range(count)]), data / "y_other_motion.mp4", fps=FPS)
    source = str(data / "clip_000.mp4")
    _ffmpeg("-ss", "0.75", "-t", "1.25", "-i", source, str(data / "x_subspan.mp4"))
    _ffmpeg("-i", source, "-vf", "hflip,pad=224:192:0:24:black", str(data / "x_mirrored_letterboxed.mp4"))
    _ffmpeg("-i", source, "-vf", "setpts=2.0*PTS", "-r", "16", str(data / "x_slowed.mp4"))
    # a phone's variable frame rate: every 4th frame from 0.5 to 2.2 s (low light), every frame around it
    _ffmpeg("-i", source, "-vf", r"select='lt(t\,0.5)+gte(t\,2.2)+not(mod(n\,4))'", "-fps_mode", "vfr",
            str(data / "x_variable_rate.mp4"))
    for video in data.glob("*.mp4"):
        video.with_suffix(".txt").write_text(caption_for(scene))
    out = tmp_path_factory.mktemp("relatives-out")
    assert cli_main(["curate", str(data), "--out", str(out), "--workers", "1", "--config", "tiny-smoke"]) == 0
    return {clip["video"]: clip for clip in json.loads((out / "report.json").read_text())["clips"]}


def test_reused_footage_is_flagged_with_its_relation_and_span(relatives):
    """Guards duplicates that survive trimming, mirroring, letterboxing and slow motion going
    unflagged (the old whole-clip hash missed all three), and the relation in the report saying the
    wrong thing: kind, mirroring, speed, and which seconds of the original the copy repeats (the
    sub-span was cut at 0.75 s for 1.25 s; spans are hashed at 8 per second, so within 1/8 s). And a copy at a
    variable frame rate (frames dropped mid-clip, as a phone does in low light) missed: its frames were timed by
    index at its average rate."""
    subspan = relatives["x_subspan.mp4"]["duplicate"]
    assert (subspan["of"], subspan["kind"], subspan["mirrored"], subspan["speed"]) == ("clip_000.mp4", "sub-span", False, 1.0)
    start, end = subspan["span_in_original_s"]
    clip_start, clip_end = subspan["span_in_clip_s"]
    assert start == pytest.approx(0.75 + clip_start, abs=0.13) and end - start == pytest.approx(clip_end - clip_start, abs=0.13)
    assert clip_end - clip_start >= 0.8 * 1.125  # the copy's hashed span (1.25 s less one sample), nearly all of it
    mirrored = relatives["x_mirrored_letterboxed.mp4"]["duplicate"]
    assert (mirrored["kind"], mirrored["mirrored"], mirrored["speed"]) == ("same footage", True, 1.0)
    assert relatives["x_mirrored_letterboxed.mp4"]["video_info"]["content_box"][:2] != [0, 137]  # bars cropped
    slowed = relatives["x_slowed.mp4"]["duplicate"]
    assert (slowed["kind"], slowed["mirrored"], slowed["speed"]) == ("same footage", False, 0.5)
    assert "slowed 2x" in slowed["summary"]
    # Timed by its packets (by index at its average rate, its end drifted 0.7 s early and it matched nothing)
    variable = relatives["x_variable_rate.mp4"]["duplicate"]
    assert (variable["kind"], variable["mirrored"], variable["speed"]) == ("same footage", False, 1.0)
    assert variable["span_in_original_s"] == pytest.approx(variable["span_in_clip_s"], abs=0.13)
    for name in ("x_subspan.mp4", "x_mirrored_letterboxed.mp4", "x_slowed.mp4", "x_variable_rate.mp4"):
        assert relatives[name]["issues"][0] == "duplicate" and relatives[name]["duplicate_of"] == "clip_000.mp4"
    # ffmpeg slows by showing each frame twice: half its frame pairs are frozen. Training reads every other
    # frame of it (8 of 16 fps), each a new picture: not `frozen` for training.
    assert relatives["x_slowed.mp4"]["issues"] == ["duplicate"]
    slowed_info = relatives["x_slowed.mp4"]["video_info"]
    assert slowed_info["frozen_fraction"] == pytest.approx(0.5, abs=0.03) and slowed_info["trained_frozen_fraction"] == 0
    assert relatives["clip_000.mp4"]["issues"] == [] and relatives["y_other_motion.mp4"]["issues"] == []


def test_content_box_crops_exactly_the_black_bars():
    """Guards letterboxed copies hashing their bars (every cell shifts, so they never match): bars
    above/below and left/right are cut, plus the one blended line where scaling meets a bar; a dark
    but textured scene edge is kept."""
    from trainer.curate.fingerprint import content_box

    rng = np.random.default_rng(0)
    frames = [np.zeros((100, 160), np.uint8) for _ in range(3)]
    for frame in frames:
        frame[12:88, 20:140] = rng.integers(60, 200, (76, 120))
        frame[12:88, 20:24] = rng.integers(10, 40, (76, 4))  # dark scene columns, not flat: part of the picture
    # Content rows 12-87 and columns 20-139; the first/last line next to a bar goes too.
    assert content_box(frames) == (13, 87, 21, 139)
    assert content_box([np.zeros((100, 160), np.uint8)]) == (0, 100, 0, 160)  # all black: nothing to crop


def test_mirroring_is_a_sign_flip_of_the_projection():
    """Guards the mirrored query: projecting a mirrored frame's hash must equal flipping the signs of
    the odd horizontal frequencies of the projection, or mirrored copies are never found."""
    from trainer.curate.duplicates import _dct_projection
    from trainer.curate.fingerprint import GRID

    projection, signs = _dct_projection()
    np.testing.assert_allclose(projection.T @ projection, np.eye(projection.shape[1]), atol=1e-6)  # orthonormal
    hashes = np.random.default_rng(1).normal(size=(5, GRID * GRID)).astype(np.float32)
    mirrored = hashes.reshape(5, GRID, GRID)[:, :, ::-1].reshape(5, -1)
    np.testing.assert_allclose(mirrored @ projection, (hashes @ projection) * signs, atol=1e-5)


@pytest.mark.parametrize(
    "caption, outcomes",
    [
        ("The striker swings and the palm lands flush on the cheek; the defender absorbs the blow.", ["clean-strike", "block-absorb"]),
        ("The striker swings but misses, the hand only grazes the chin and the defender stays on his feet.", ["block-absorb", "miss"]),
        ("A clubbing blow with the heel of the hand: the referee calls a foul after the palm strikes the cheek.", ["foul"]),
        ("The palm connects and the defender collapses, out cold; the referee waves off the bout.", ["clean-strike", "knockout"]),
        ("Two athletes stand across the table under bright lights.", []),
    ],
)
def test_outcome_labels(caption, outcomes):
    """Guards the outcome labels hard-negative selection relies on: a strike that missed or was a
    foul is never also a clean strike, and a caption can be a clean strike the defender absorbs."""
    assert check_caption(caption).outcomes == outcomes


def _record(name: str, categories: list[str], outcomes: list[str], score: float, issues=()) -> dict:
    return {"video": name, "issues": list(issues), "video_info": {"duration_s": 2.0},
            "caption": {"categories": categories, "outcomes": outcomes, "score": score}}


def test_hard_negative_share_reserves_part_of_the_selection():
    """Guards `--hard-negatives`: round(N * share) slots go to the best clean hard negatives (miss,
    foul, block/absorb, round robin over those labels, rarest first), the rest is the category round
    robin as before; a flagged hard negative is never taken."""
    from trainer.curate.selection import select_best

    records = [
        _record("strike_a", ["strike"], ["clean-strike"], 0.9),
        _record("strike_b", ["strike"], ["clean-strike"], 0.8),
        _record("ko_a", ["knockout"], ["clean-strike", "knockout"], 0.7),
        _record("miss_a", ["strike"], ["miss"], 0.5),
        _record("miss_b", ["strike"], ["miss"], 0.6),
        _record("foul_a", ["strike"], ["foul"], 0.4),
        _record("absorb_a", ["block-absorb"], ["block-absorb"], 0.3),
        _record("miss_flagged", ["strike"], ["miss"], 0.99, issues=["duplicate"]),
    ]
    names = lambda chosen: [r["video"] for r in chosen]  # noqa: E731
    # 4 x 0.5 = 2 reserved: rarest hard-negative labels first (foul and block-absorb have 1 clip, miss 2).
    assert names(select_best(records, 4, 0.5)) == ["foul_a", "absorb_a", "ko_a", "strike_a"]
    # Without a share: categories only, rarest first (block-absorb and knockout hold one clip each; ties
    # keep the CATEGORIES order), then strike's best two.
    assert names(select_best(records, 4)) == ["absorb_a", "ko_a", "strike_a", "strike_b"]
    # A share larger than the hard negatives there are takes them all, then fills up as usual.
    chosen = names(select_best(records, 7, 1.0))
    assert chosen[:4] == ["foul_a", "absorb_a", "miss_b", "miss_a"] and "miss_flagged" not in chosen and len(chosen) == 7


def test_report_shows_coverage_per_label_before_and_after_selection(demo_dataset, tmp_path, capsys):
    """Guards the coverage table: per category and outcome, how many clips carry the label in the
    whole dataset, among the clean clips and in the selection, counted from the report's own records; and the
    command's selection line, which counts the selected hard negatives in words that read right for one
    ("1 hard negatives" before)."""
    out = tmp_path / "out"
    assert cli_main(["curate", str(demo_dataset), "--out", str(out), "--select", "3", "--hard-negatives", "0.34",
                     "--workers", "1", "--config", "tiny-smoke"]) == 0
    report = json.loads((out / "report.json").read_text())
    clips = {c["video"]: c for c in report["clips"]}
    selected = [clips[name] for name in report["selected"]]
    coverage = report["summary"]["coverage"]
    for key in ("categories", "outcomes"):
        for label, counts in coverage[key].items():
            assert counts == {"clips": sum(label in c["caption"][key] for c in clips.values()),
                              "clean": sum(label in c["caption"][key] for c in clips.values() if not c["issues"]),
                              "selected": sum(label in c["caption"][key] for c in selected)}
    # The demo's outcomes cycle absorbs / staggers / knockout: clips 000 and 003 absorb (hard negatives);
    # round(3 * 0.34) = 1 slot is theirs.
    assert coverage["outcomes"]["block-absorb"]["clips"] == 2 and coverage["outcomes"]["block-absorb"]["selected"] >= 1
    hard = report["summary"]["hard_negatives_selected"]
    assert hard == coverage["outcomes"]["block-absorb"]["selected"]
    said = {1: "(1 of them a hard negative: miss, foul, block/absorb)",
            2: "(2 of them hard negatives: miss, foul, block/absorb)"}[hard]
    assert f"selected 3 (3 requested) -> {out / 'selected.jsonl'} {said}" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "Coverage per label, before and after selection" in page and "block-absorb" in page


def test_hard_negative_share_needs_a_selection_and_a_share(planted, tmp_path, capsys):
    assert cli_main(["curate", str(planted), "--out", str(tmp_path / "o"), "--hard-negatives", "0.2"]) == 2
    assert "--select" in capsys.readouterr().err
    assert cli_main(["curate", str(planted), "--out", str(tmp_path / "o"), "--select", "2", "--hard-negatives", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_relations_between_fingerprints_without_any_match_or_with_an_exact_copy():
    """Guards the vectorised search crashing when nothing matches (an empty candidate set) and the
    plainest case: three unrelated random fingerprints give no relation; adding an exact copy of the
    first gives exactly one, same footage at speed 1 over the whole clip."""
    from trainer.curate.duplicates import find_duplicates, find_relations
    from trainer.curate.fingerprint import Signature

    rng = np.random.default_rng(0)
    unrelated = [Signature(np.arange(20) / 8, rng.normal(0, 0.1, (20, 64)).astype(np.float32)) for _ in range(3)]
    assert find_relations([]) == [] and find_relations([None, unrelated[0]]) == []
    assert find_relations(unrelated) == [] and find_duplicates(unrelated) == {}
    (relation,) = find_relations([*unrelated, unrelated[0]])
    assert (relation.clip, relation.original, relation.kind, relation.speed, relation.mirrored) == (0, 3, "same footage", 1.0, False)
    assert relation.span_in_clip == relation.span_in_original == (0.0, 19 / 8) and relation.distance == 0.0
    assert find_duplicates([*unrelated, unrelated[0]]) == {3: (0, relation.reversed())}


def test_a_dataset_with_a_few_unreadable_clips_goes_on_as_the_clips_training_reads(demo_dataset, tmp_path, capsys):
    """Guards a few bad captions stopping a dataset of thousands for good (a walk-through's 25 of 2,550 clips: train,
    precompute and eval refuse them all, and `--select N` needed N guessed at least as large as the clean count, then
    said "selected 485 of 3000 requested"): the refusal says how to go on, and `curate --select usable` writes every
    clip training reads, flagged for quality or not (here captions under curate's 50 words, which `--select all`, the
    clean clips, leaves out: a review's case of a selection left empty), without the unreadable and empty captions;
    --select takes a count, all or usable."""
    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    for name in ("clip_000", "clip_003"):
        (data / f"{name}.txt").write_text("the striker winds up and slaps the defender, whose head snaps aside")
    (data / "clip_001.txt").write_bytes(b"\xff\xfe not utf-8")
    (data / "clip_002.txt").write_text("  \n")
    with pytest.raises(DatasetError) as refused:
        read_dataset(data)
    assert str(refused.value).endswith(
        f"(`slapgen curate {data} --out DIR --select usable` reports every clip's problems and writes the clips training "
        "can read to DIR/selected.jsonl, a dataset --data takes)")
    out = tmp_path / "curated"
    for select, said, expected in (("usable", "every clip training can read, flagged or not", ["clip_000.mp4", "clip_003.mp4"]),
                                   ("all", "every clean clip", [])):
        assert cli_main(["curate", str(data), "--out", str(out), "--select", select, "--workers", "1",
                         "--config", "tiny-smoke"]) == 0
        assert f"selected {len(expected)} ({said}) -> {out / 'selected.jsonl'}" in capsys.readouterr().out
        report = json.loads((out / "report.json").read_text())
        assert report["selected"] == expected
        if expected:
            assert [clip.video.name for clip in read_dataset(out / "selected.jsonl")] == expected
    assert {clip["video"]: clip["issues"] for clip in report["clips"]}["clip_000.mp4"] == ["caption_too_short"]
    with pytest.raises(SystemExit):
        cli_main(["curate", str(data), "--out", str(out), "--select", "most"])
    assert "--select: expected a number of clips, all or usable, got 'most'" in capsys.readouterr().err
    assert cli_main(["curate", str(data), "--out", str(out), "--select", "usable", "--hard-negatives", "0.2"]) == 2
    assert "--select usable takes every clip it names, hard negatives among them" in capsys.readouterr().err


def _decoded_clips(log) -> list[str]:
    """The clips ffmpeg was asked to read (`-i FILE`; the probe's decode and its packet times), from the logging
    wrapper's lines."""
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines()]
    return sorted({Path(words[words.index("-i") + 1]).name for words in lines})


def test_a_rerun_decodes_only_the_clips_that_are_new_or_changed(demo_dataset, tmp_path, monkeypatch, capsys):
    """Guards a second curate into the same folder decoding every clip again (an hour or more for a few thousand
    real clips, when only captions or the selection changed), and a cache that would serve a stale measurement:
    ffmpeg is a wrapper that logs what it is asked to read. The rerun reads nothing and reports what the first
    run measured, thumbnails included; a clip replaced by other footage is decoded again, even one of the same
    size with its old modification time put back (the clip it was copied from is then its duplicate); a clip removed from the dataset leaves the cache."""
    data = _small_dataset(demo_dataset, tmp_path / "data")
    log = tmp_path / "ffmpeg.log"
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -i "*) echo "$*" >> "{log}";; esac\n'
                       f'exec "{imageio_ffmpeg.get_ffmpeg_exe()}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(wrapper))
    out = tmp_path / "out"

    def curate(*extra: str) -> dict:
        log.unlink(missing_ok=True)
        assert cli_main(["curate", str(data), "--out", str(out), "--workers", "2", "--config", "tiny-smoke", *extra]) == 0
        return json.loads((out / "report.json").read_text())

    first = curate()
    assert _decoded_clips(log) == ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4"]
    thumbnails = {path.name: path.read_bytes() for path in (out / "thumbnails").iterdir()}
    for path in (out / "thumbnails").iterdir():
        path.unlink()
    capsys.readouterr()

    again = curate("--select", "2")
    assert _decoded_clips(log) == []
    assert again["clips"] == first["clips"] and again["summary"]["from_probe_cache"] == 3
    assert {path.name: path.read_bytes() for path in (out / "thumbnails").iterdir()} == thumbnails
    assert f"3 clips not decoded again: unchanged since an earlier curate into {out}" in capsys.readouterr().out

    # Other footage under the same name, of the same size with the old modification time put back (`touch -r`):
    # only its status-change time tells. The larger of two clips gets the smaller's bytes, padded to its size.
    small, large = sorted((data / "clip_001.mp4", data / "clip_002.mp4"), key=lambda path: path.stat().st_size)
    size, mtime = large.stat().st_size, large.stat().st_mtime_ns
    large.write_bytes(small.read_bytes().ljust(size, b"\0"))
    os.utime(large, ns=(mtime, mtime))
    for name in ("clip_000.mp4", "clip_000.txt"):
        (data / name).unlink()
    changed = curate()
    assert _decoded_clips(log) == [large.name] and changed["summary"]["from_probe_cache"] == 1
    by_name = {clip["video"]: clip for clip in changed["clips"]}
    assert by_name["clip_001.mp4"]["video_info"] == by_name["clip_002.mp4"]["video_info"]
    assert by_name["clip_002.mp4"]["duplicate_of"] == "clip_001.mp4"  # the same footage now; the first is kept
    with sqlite3.connect(out / "probes.sqlite") as cache:
        kept = sorted(Path(os.fsdecode(path)).name for (path,) in cache.execute("SELECT path FROM probes"))
    assert kept == ["clip_001.mp4", "clip_002.mp4"]


def test_a_probe_cache_that_is_damaged_or_of_other_code_is_not_used(demo_dataset, tmp_path, monkeypatch):
    """Guards the cache breaking curate or serving measurements it should not: a file that is no SQLite database
    is replaced (curate goes on and measures every clip), and so is an older layout of the table; one a database
    tool analysed (sqlite_stat1) is still ours; a row measured by other probe code or another ffmpeg (`measurer`)
    is a miss, and so is a row for the file as it was before it changed (size, mtime, ctime)."""
    from trainer.curate import probe_cache
    from trainer.curate.probe_cache import FileState, ProbeCache
    from trainer.curate.video_probe import probe_video

    (tmp_path / "probes.sqlite").write_bytes(b"not a database" * 100)
    cache = ProbeCache(tmp_path)
    video = demo_dataset / "clip_000.mp4"
    state = FileState.of(str(video))
    assert cache.get(state) is None
    probe = probe_video(video)
    cache.put(state, probe, b"png")
    hit, thumbnail = cache.get(state)
    assert thumbnail == b"png" and hit.to_json() == probe.to_json()
    np.testing.assert_array_equal(hit.signature.hashes, probe.signature.hashes)
    np.testing.assert_array_equal(hit.signature.times, probe.signature.times)
    assert hit.signature.box == probe.signature.box
    np.testing.assert_array_equal(hit.black_frames, probe.black_frames)
    np.testing.assert_array_equal(hit.frozen_frames, probe.frozen_frames)
    assert len(hit.black_frames) == probe.frame_count
    np.testing.assert_array_equal(hit.frame_times, probe.frame_times)
    assert cache.get(FileState(state.path, state.size, state.mtime_ns + 1, state.ctime_ns)) is None
    assert cache.get(FileState(state.path, state.size + 1, state.mtime_ns, state.ctime_ns)) is None
    assert cache.get(FileState(state.path, state.size, state.mtime_ns, state.ctime_ns + 1)) is None
    cache.close()
    with sqlite3.connect(tmp_path / "probes.sqlite") as tool:  # a database tool's ANALYZE adds sqlite_stat1
        tool.execute("ANALYZE")
    assert ProbeCache(tmp_path).get(state) is not None
    monkeypatch.setattr(probe_cache, "measurer", lambda: "other code")
    assert ProbeCache(tmp_path).get(state) is None
    older = tmp_path / "older"  # an older slapgen's layout: replaced, then used
    older.mkdir()
    with sqlite3.connect(older / "probes.sqlite") as previous:
        previous.execute("CREATE TABLE probes (path TEXT PRIMARY KEY, size INTEGER)")
    cache = ProbeCache(older)
    cache.put(state, probe, b"png")
    assert cache.get(state) is not None
    cache.close()


def test_a_curate_stopped_halfway_keeps_what_it_measured(demo_dataset, tmp_path, monkeypatch):
    """Guards the probe cache being written only at the end, so a curate stopped (Ctrl-C, a crash) after hours of
    decoding kept nothing: the run below stops as it reads its second clip's caption (that clip's probe is back),
    and the rerun decodes only the third."""
    from trainer.curate import run

    data = _small_dataset(demo_dataset, tmp_path / "data")
    checked = []

    def stop_on_the_second(caption):
        checked.append(caption)
        if len(checked) == 2:
            raise KeyboardInterrupt
        return check_caption(caption)

    monkeypatch.setattr(run, "check_caption", stop_on_the_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run.curate(data, out, run.CurateSettings(num_frames=9, workers=1), progress=False)
    monkeypatch.setattr(run, "check_caption", check_caption)
    report = run.curate(data, out, run.CurateSettings(num_frames=9, workers=1), progress=False)
    assert report["summary"]["from_probe_cache"] == 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores this process may run on")
def test_curates_default_workers_are_the_cores_this_process_may_use(demo_dataset, tmp_path):
    """Guards curate's default workers counted by `os.cpu_count()`, the machine's cores: a process limited to fewer (by
    taskset or a Slurm allocation; by a container's CPU limit alike, through joblib's count) started a prober per core
    of the machine (128 in a pod of 8 CPUs). Limited to one core by its real affinity, curate starts one."""
    from trainer.curate import run

    data = _small_dataset(demo_dataset, tmp_path / "data")
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this thread's, which curate's count and its workers go by
    try:
        report = run.curate(data, tmp_path / "out", run.CurateSettings(num_frames=9), progress=False)
    finally:
        os.sched_setaffinity(0, allowed)
    assert report["settings"]["workers"] == 1 < (os.cpu_count() or 1)
    assert len(report["clips"]) == 3


def test_black_and_frozen_are_judged_on_the_frames_training_reads(tmp_path):
    """Guards curate judging a clip by all of it while training reads only its start: a clip whose first 1.5 s are
    black (or a still title card) and the rest a bout was clean, and training (1 s: tiny-smoke's 9 frames at 8 fps,
    frames 0-16 at 16 fps) read nothing but the black; a clip whose end is black was flagged and left out, though
    training reads only its good start. And a variable-frame-rate clip (a phone's) is judged at the instants
    training reads it: 0.3 s of black at 60 fps, then 10 fps, was "black" by its first frames (18 of them), while
    training's 9 frames hold 3 black ones. A moving clip of 4 fps, each frame of which training reads twice, is not
    frozen for that (it was half frozen). The fractions are checked against counts written out here, and the
    variable-rate clip's against the frames the trainer's own `load_clip` reads."""
    from trainer.curate.video_probe import BLACK_LUMA
    from trainer.demo_data import FPS, HEIGHT, WIDTH, DemoClip, caption_for, render_frame
    from trainer.frames import load_clip

    scene = DemoClip(striker_on_left=True, striker_colour="red", defender_colour="blue", outcome="staggers",
                     camera="pan", backdrop=0.3)
    bout = np.stack([render_frame(scene, i / 39) for i in range(40)])  # 2.5 s at 16 fps
    black = np.zeros((24, HEIGHT, WIDTH, 3), np.float32)  # 1.5 s
    still = np.repeat(bout[:1], 24, axis=0)
    data = tmp_path / "data"
    data.mkdir()
    for name, frames in {"black_intro": [black, bout], "black_end": [bout[:24], black, black[:16]],
                         "still_intro": [still, bout[1:]]}.items():
        write_mp4(np.concatenate(frames), data / f"{name}.mp4", fps=FPS)
        (data / f"{name}.txt").write_text(caption_for(scene))
    write_mp4(bout[::4], data / "low_rate.mp4", fps=4)  # moving at 4 fps, which training reads at 8: each frame twice
    (data / "low_rate.txt").write_text(caption_for(scene))
    # Studio-range luma (16 is black): black for 0.3 s, then brightening and dimming; all of the first 0.3 s at
    # 60 fps, then every 6th frame (10 fps).
    _ffmpeg("-f", "lavfi", "-i", "color=c=black:s=64x48:r=60:d=6,format=yuv420p,"
            "geq=lum='if(lt(T,0.3),16,60+150*mod(T,1))':cb=128:cr=128", "-vf", r"select='lt(t\,0.3)+not(mod(n\,6))'",
            "-fps_mode", "vfr", "-c:v", "libx264", "-qp", "0", str(data / "vfr_black_intro.mp4"))
    (data / "vfr_black_intro.txt").write_text(caption_for(scene))
    out = tmp_path / "out"
    assert cli_main(["curate", str(data), "--out", str(out), "--workers", "1", "--config", "tiny-smoke"]) == 0
    clips = {clip["video"]: clip for clip in json.loads((out / "report.json").read_text())["clips"]}
    issues = {name: [code for code in clip["issues"] if code != "duplicate"] for name, clip in clips.items()}
    assert issues == {"black_end.mp4": [], "black_intro.mp4": ["black"], "still_intro.mp4": ["frozen"],
                      "vfr_black_intro.mp4": [], "low_rate.mp4": []}
    assert clips["low_rate.mp4"]["video_info"]["trained_frozen_fraction"] == 0.0
    intro, end, still_info = (clips[f"{name}.mp4"]["video_info"] for name in ("black_intro", "black_end", "still_intro"))
    assert intro["trained_frames"] == end["trained_frames"] == 17  # frames 0..16: 9 frames at 8 of 16 fps
    assert (intro["black_fraction"], intro["trained_black_fraction"]) == (24 / 64, 1.0)
    assert (end["black_fraction"], end["trained_black_fraction"]) == (40 / 64, 0.0)
    # frozen: pairs of consecutive frames, the still's 23 of the 62 in all (63 frames); training reads frames 0, 2,
    # ..., 16 of it, still all: its 8 pairs
    assert (still_info["frozen_fraction"], still_info["trained_frozen_fraction"]) == (pytest.approx(23 / 62), 1.0)
    vfr = clips["vfr_black_intro.mp4"]["video_info"]
    read = load_clip(data / "vfr_black_intro.mp4", num_frames=9, fps=8, height=48, width=64)  # tiny-smoke's
    black_read = ((read + 1) / 2).mean(dim=(1, 2, 3)) <= BLACK_LUMA
    assert vfr["trained_black_fraction"] == pytest.approx(float(black_read.float().mean()), abs=1e-4) == 3 / 9
    assert vfr["black_fraction"] == 18 / 75  # by frames: 18 at 60 fps, then 57 at 10 fps


def test_a_probe_cache_that_cannot_be_used_is_done_without_and_left_alone(demo_dataset, tmp_path):
    """Guards the cache stopping curate with a traceback (sqlite3's OperationalError, or IsADirectoryError while
    replacing it), or destroying what is not its own: a folder where probes.sqlite should be, another program's
    database there (a link to it), and a cache another process holds locked (a database browser left open: the
    file was deleted under it, its transaction lost) each mean every clip is decoded, as without a cache, and
    the file is left as it was."""
    from trainer.curate import run

    data = _small_dataset(demo_dataset, tmp_path / "data")
    settings = run.CurateSettings(num_frames=9, workers=1)
    folder = tmp_path / "folder"
    (folder / "probes.sqlite").mkdir(parents=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(tmp_path / "app.db") as app:
        app.execute("CREATE TABLE users (name TEXT)")
    (foreign / "probes.sqlite").symlink_to(tmp_path / "app.db")
    locked = tmp_path / "locked"
    run.curate(data, locked, settings, progress=False)  # a cache of 3 rows
    holder = sqlite3.connect(locked / "probes.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for out in (folder, foreign, locked):
            report = run.curate(data, out, settings, progress=False)
            assert report["summary"]["from_probe_cache"] == 0 and report["summary"]["clean"] == 3, out
        holder.execute("DELETE FROM probes WHERE rowid = (SELECT min(rowid) FROM probes)")
        holder.execute("COMMIT")
    finally:
        holder.close()
    assert (folder / "probes.sqlite").is_dir()
    with sqlite3.connect(tmp_path / "app.db") as app:
        assert [name for (name,) in app.execute("SELECT name FROM sqlite_master")] == ["users"]
    with sqlite3.connect(locked / "probes.sqlite") as cache:
        assert cache.execute("SELECT count(*) FROM probes").fetchone() == (2,)  # the holder's change, kept


def test_frame_times_are_the_packets_and_evenly_spaced_where_they_cannot_be(tmp_path):
    """Guards frames judged at the wrong instants: a variable-frame-rate clip's frames at the times its packets
    say (the 30 fps part, then every 4th frame), and, where the packets do not match the frames decoded (a count
    that differs, times that do not span the clip), evenly spaced at the average rate rather than times that
    belong to other frames. A clip trimmed by an edit list has packets before its start (negative times), which
    are no frames; and a 23.976 fps clip (its rate printed 23.98) is not taken as uneven."""
    from trainer.curate.video_probe import _evenly_spaced, packet_times, probe_video, times_of_frames

    def frame_times(path, count: int, fps: float):
        return times_of_frames(packet_times(path), count, fps)[0]

    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=30:duration=1.25", "-vf",
            r"select='lt(n\,20)+not(mod(n\,4))'", "-fps_mode", "vfr", "-c:v", "libx264", str(tmp_path / "vfr.mp4"))
    shot = [n / 30 for n in range(20)] + [n / 30 for n in range(20, 38, 4)]
    assert frame_times(tmp_path / "vfr.mp4", 25, 20.0) == pytest.approx(shot, abs=1e-6)
    assert frame_times(tmp_path / "vfr.mp4", 26, 20.0) == pytest.approx([k / 20 for k in range(26)])
    # times that do not span the length the average rate gives (1.2 s against 24 / 5 = 4.8 s: another stream's)
    assert frame_times(tmp_path / "vfr.mp4", 25, 5.0) == pytest.approx([k / 5 for k in range(25)])
    # Trimmed by an edit list (a stream copy from 0.3 s): the packets before it, decoded and dropped, are not frames
    _ffmpeg("-ss", "0.3", "-i", str(tmp_path / "vfr.mp4"), "-c", "copy", str(tmp_path / "trimmed.mp4"))
    kept = [t - 0.3 for t in shot if t >= 0.3 - 1e-9]
    assert packet_times(tmp_path / "trimmed.mp4") == pytest.approx(kept, abs=1e-6)
    assert probe_video(tmp_path / "trimmed.mp4").frame_count == len(kept)
    # A constant rate of 24000/1001 (printed 23.98) is evenly spaced for a minute and more
    assert _evenly_spaced(np.arange(2400) * 1001 / 24000)
