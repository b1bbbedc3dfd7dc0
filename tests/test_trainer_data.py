import json
import shutil

import numpy as np
import pytest

from slapgen.images import resize_and_crop
from trainer.datasets import read_dataset
from trainer.demo_data import OUTCOMES, DemoClip, caption_for, write_demo_dataset
from trainer.errors import ClipError, DatasetError
from trainer.frames import load_clip, sample_indices


def _copy_clips(demo_dataset, target, count=2):
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"clip_{index:03d}.mp4"
        shutil.copy(demo_dataset / name, target / name)
        names.append(name)
    return names


def test_folder_of_pairs(demo_dataset):
    clips = read_dataset(demo_dataset)
    assert [c.name for c in clips] == [f"clip_{i:03d}.mp4" for i in range(4)]
    assert all(c.caption and c.video.is_file() for c in clips)


def test_videos_and_prompts_txt(demo_dataset, tmp_path):
    names = _copy_clips(demo_dataset, tmp_path / "videos")
    (tmp_path / "videos.txt").write_text("\n".join(f"videos/{n}" for n in names) + "\n\n")
    (tmp_path / "prompts.txt").write_text("first caption\nsecond caption\n")
    clips = read_dataset(tmp_path)
    assert [(c.name, c.caption) for c in clips] == [("videos/clip_000.mp4", "first caption"), ("videos/clip_001.mp4", "second caption")]


def test_csv_and_jsonl(demo_dataset, tmp_path):
    names = _copy_clips(demo_dataset, tmp_path)
    (tmp_path / "data.csv").write_text("video,caption\n" + "".join(f'{n},"a, quoted caption {i}"\n' for i, n in enumerate(names)))
    assert [c.caption for c in read_dataset(tmp_path / "data.csv")] == ["a, quoted caption 0", "a, quoted caption 1"]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"video": n, "caption": f"c{i}", "extra": 1}) + "\n" for i, n in enumerate(names)))
    assert [c.caption for c in read_dataset(tmp_path / "data.jsonl")] == ["c0", "c1"]


@pytest.mark.parametrize(
    "files,message",
    [
        ({"data.csv": "video,text\nclip_000.mp4,hi\n"}, "missing 'caption'"),
        ({"data.csv": "video,caption\nmissing.mp4,hi\n"}, "missing.mp4 not found"),
        ({"data.csv": "video,caption\nclip_000.mp4,   \n"}, "empty caption"),
        ({"data.jsonl": '{"video": "clip_000.mp4", "caption": "x"}\nnot json\n'}, "line 2 is not valid JSON"),
        ({"videos.txt": "clip_000.mp4\nclip_001.mp4\n", "prompts.txt": "only one\n"}, "prompts.txt has 1"),
        ({"videos.txt": "clip_000.mp4\n"}, "no prompts.txt"),
    ],
)
def test_bad_datasets_say_what_is_wrong(demo_dataset, tmp_path, files, message):
    _copy_clips(demo_dataset, tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    target = tmp_path / next(iter(files)) if next(iter(files)).endswith(("csv", "jsonl")) else tmp_path
    with pytest.raises(DatasetError, match=message):
        read_dataset(target)


def test_missing_captions_allowed_only_when_asked(demo_dataset, tmp_path):
    """Also guards a clip without its .txt refused as having "an empty caption" (the user looks for an empty
    file that is not there): the sentence names the file to write and the command that writes it."""
    _copy_clips(demo_dataset, tmp_path)
    (tmp_path / "clip_000.txt").write_text("a caption")
    with pytest.raises(DatasetError) as error:
        read_dataset(tmp_path)
    assert str(error.value) == (f"video clip_001.mp4 has no caption: write clip_001.txt beside it, or caption the "
                                f"clips that have none with `slapgen caption {tmp_path}`")
    assert [c.caption for c in read_dataset(tmp_path, require_captions=False)] == ["a caption", None]


def test_a_folder_without_videos_says_what_a_clip_is(tmp_path):
    """Guards a folder of stills (or .gif, .txt) refused as "holds no clips" with nothing on what counts as
    one: the sentence lists the video suffixes read and the videos.txt + prompts.txt layout."""
    (tmp_path / "frame.png").write_bytes(b"png")
    (tmp_path / "frame.txt").write_text("a caption")
    with pytest.raises(DatasetError) as error:
        read_dataset(tmp_path)
    assert str(error.value) == (f"dataset {tmp_path} holds no clips: no video file (.mp4, .mov, .webm, .mkv, .avi, "
                                ".m4v) in it or its subfolders, and no videos.txt + prompts.txt")


def test_sample_indices_follow_the_target_fps():
    assert sample_indices(16, 8, 5) == [0, 2, 4, 6, 8]
    assert sample_indices(24, 8, 3) == [0, 3, 6]
    assert sample_indices(8, 8, 3) == [0, 1, 2]


def test_load_clip_samples_resizes_and_scales(demo_dataset):
    video = load_clip(demo_dataset / "clip_000.mp4", num_frames=17, fps=8, height=64, width=96)
    assert video.shape == (17, 3, 64, 96)
    assert -1.0 <= video.min() < 0 < video.max() <= 1.0
    assert not np.allclose(video[0].numpy(), video[10].numpy())  # frames really advance


def test_resize_and_crop_keeps_the_centre():
    import torch

    video = torch.zeros(1, 3, 100, 300)
    video[..., 120:180] = 255  # a bright band in the middle third
    cropped = resize_and_crop(video, 64, 64)
    assert cropped.shape == (1, 3, 64, 64)
    assert cropped[..., :, 32].mean() > 200 and cropped[..., :, 0].mean() < 50


def test_short_and_corrupt_clips_raise_clip_errors(demo_dataset, tmp_path):
    with pytest.raises(ClipError) as short:
        load_clip(demo_dataset / "clip_000.mp4", num_frames=49, fps=8, height=64, width=96)  # 2.5 s < 6 s
    assert short.value.reason == "too_short"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    with pytest.raises(ClipError) as corrupt:
        load_clip(broken, num_frames=9, fps=8, height=64, width=96)
    assert corrupt.value.reason == "corrupt"


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_demo_captions_follow_the_research_notes(outcome):
    caption = caption_for(DemoClip(True, "red", "blue", outcome, "pan", backdrop=0.3))
    assert 50 <= len(caption.split()) <= 100
    for aspect_word in ("weight", "strikes", "impact", "camera"):
        assert aspect_word in caption


def test_demo_clips_are_all_distinct(tmp_path):
    paths = write_demo_dataset(tmp_path, clips=12)
    assert len({p.read_bytes() for p in paths}) == 12


BAD_UTF8 = b"Power slap: the striker \xff\xfe swings"  # \xff never occurs in UTF-8


@pytest.mark.parametrize("layout", ["pairs", "prompts.txt", "data.csv", "data.jsonl"])
def test_invalid_utf8_caption_names_its_file_or_flags_the_clip(demo_dataset, tmp_path, layout):
    """Guards a caption that is not UTF-8 crashing `train` and `curate` (UnicodeDecodeError): training
    gets a one-line DatasetError naming the file, curation the clip flagged `caption_unreadable`, and
    the other clip of the same file keeps its caption."""
    names = _copy_clips(demo_dataset, tmp_path)
    rows = [b"a good caption", BAD_UTF8]
    if layout == "pairs":
        for name, caption in zip(names, rows):
            (tmp_path / name).with_suffix(".txt").write_bytes(caption)
        target, where = tmp_path, "clip_001.txt"
    elif layout == "prompts.txt":
        (tmp_path / "videos.txt").write_text("\n".join(names) + "\n")
        (tmp_path / "prompts.txt").write_bytes(b"\n".join(rows) + b"\n")
        target, where = tmp_path, "prompts.txt line 2"
    elif layout == "data.csv":
        (tmp_path / layout).write_bytes(b"video,caption\n" + b"".join(n.encode() + b"," + c + b"\n" for n, c in zip(names, rows)))
        target, where = tmp_path / layout, "data.csv line 3"
    else:
        lines = [b'{"video": "' + n.encode() + b'", "caption": "' + c + b'"}\n' for n, c in zip(names, rows)]
        (tmp_path / layout).write_bytes(b"".join(lines))
        target, where = tmp_path / layout, "data.jsonl line 2"
    with pytest.raises(DatasetError) as error:
        read_dataset(target)
    assert str(error.value) == f"{where}: caption of clip_001.mp4 is not valid UTF-8"
    good, bad = read_dataset(target, require_captions=False, require_files=False)
    assert (good.caption, good.issues) == ("a good caption", ())
    assert (bad.caption, bad.issues) == (None, ("caption_unreadable",))


def test_every_unusable_clip_is_named_in_one_error(demo_dataset, tmp_path):
    """Guards `train` naming one dataset problem per start (a walk-through stopped three times in a row, on a
    caption that is not UTF-8, a missing caption and an empty one, each start costing seconds): one error names
    each, with where to see every clip's problems; with more than SHOWN_PROBLEMS, how many more."""
    from trainer.datasets import SHOWN_PROBLEMS

    names = _copy_clips(demo_dataset, tmp_path / "data", count=4)
    data = tmp_path / "data"
    (data / names[0]).with_suffix(".txt").write_bytes(BAD_UTF8)
    (data / names[2]).with_suffix(".txt").write_text("  \n")
    (data / names[3]).with_suffix(".txt").write_text("a good caption")
    with pytest.raises(DatasetError) as error:
        read_dataset(data)
    assert str(error.value) == (
        f"3 clips of {data} cannot be used: clip_000.txt: caption of clip_000.mp4 is not valid UTF-8; clip_002.mp4: "
        "video clip_002.mp4 has an empty caption; video clip_001.mp4 has no caption: write clip_001.txt beside it, or "
        f"caption the clips that have none with `slapgen caption {data}` (`slapgen curate {data} --out DIR --select "
        "usable` reports every clip's problems and writes the clips training can read to DIR/selected.jsonl, a dataset "
        "--data takes)")
    # More uncaptioned videos: said in one sentence (the same advice was repeated for each)
    for index in range(4, 8):
        shutil.copy(demo_dataset / "clip_000.mp4", data / f"clip_{index:03d}.mp4")
    with pytest.raises(DatasetError) as grouped:
        read_dataset(data)
    assert (f"7 clips of {data} cannot be used: clip_000.txt: caption of clip_000.mp4 is not valid UTF-8; clip_002.mp4: "
            "video clip_002.mp4 has an empty caption; 5 videos have no caption (clip_001.mp4, clip_004.mp4, "
            f"clip_005.mp4, and 2 more): write a .txt beside each, or caption the clips that have none with `slapgen "
            f"caption {data}`") in str(grouped.value)
    for index in range(SHOWN_PROBLEMS + 2):  # past SHOWN_PROBLEMS problems of other kinds: how many more
        (data / f"bad_{index}.txt").write_text("  ")
        shutil.copy(demo_dataset / "clip_000.mp4", data / f"bad_{index}.mp4")
    with pytest.raises(DatasetError, match=r"; and 5 more problems \(`slapgen curate"):  # problems, not clips
        read_dataset(data)


def test_links_out_of_the_dataset_are_never_followed(demo_dataset, tmp_path):
    """Guards the dataset reader following symbolic links out of the dataset folder (curation then put
    the outside file's text in its report): a video or caption that leads out is a DatasetError for
    training and an issue for curation, and the outside caption is never read. A link that stays
    inside the folder is followed like the file itself."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET " * 20)
    shutil.copy(demo_dataset / "clip_001.mp4", outside / "elsewhere.mp4")
    data = tmp_path / "data"
    _copy_clips(demo_dataset, data, count=1)
    (data / "clip_000.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(DatasetError, match="^clip_000.txt: caption of clip_000.mp4 is a link out of the dataset folder$"):
        read_dataset(data)
    (data / "clip_000.txt").unlink()
    (data / "clip_000.txt").write_text("a good caption")
    (data / "sub").mkdir()
    (data / "sub" / "alias.mp4").symlink_to("../clip_000.mp4")  # stays inside: followed
    (data / "sub" / "alias.txt").write_text("the alias's caption")
    assert [(c.name, c.video, c.issues) for c in read_dataset(data)] == [
        ("clip_000.mp4", (data / "clip_000.mp4").resolve(), ()), ("sub/alias.mp4", (data / "clip_000.mp4").resolve(), ())]
    (data / "z_link.mp4").symlink_to(outside / "elsewhere.mp4")
    (data / "z_link.txt").write_text("a caption")
    with pytest.raises(DatasetError, match="^z_link.mp4: video z_link.mp4 is a link out of the dataset folder$"):
        read_dataset(data)
    (data / "secret.mp4").write_bytes(b"")
    (data / "secret.txt").symlink_to(outside / "secret.txt")
    flagged = {c.name: (c.caption, c.issues) for c in read_dataset(data, require_captions=False, require_files=False)}
    assert flagged["z_link.mp4"] == ("a caption", ("outside_dataset",))
    assert flagged["secret.mp4"] == (None, ("caption_outside_dataset",))
    # A listing may name a file outside its folder in plain sight (curation's selected.jsonl does).
    (tmp_path / "list.jsonl").write_text('{"video": "data/clip_000.mp4", "caption": "c"}\n{"video": "outside/elsewhere.mp4", "caption": "d"}\n')
    assert [c.issues for c in read_dataset(tmp_path / "list.jsonl")] == [(), ()]


def test_demo_banners_are_drawn_on_the_back_wall_and_pan_with_the_camera():
    """Guards the duplicates bench's venues (`bench/duplicates.py --venues`): a banner lands where it is
    placed, moved by the camera's pan at that instant (12 sin(pi t) pixels), and changes no pixel outside
    its rectangle (without banners, the frame is the one the default set and `slapgen demo-data` draw)."""
    import math

    import numpy as np

    from trainer.demo_data import DemoClip, render_frame

    plain = DemoClip(striker_on_left=True, striker_colour="red", defender_colour="blue", outcome="absorbs",
                     camera="pan", backdrop=0.3)
    colour = (0.1, 0.9, 0.2)
    venue = DemoClip(**{**plain.__dict__, "banners": ((10.0, 4.0, 30.0, 10.0, colour),)})
    t = 0.3
    pan = 12 * math.sin(t * math.pi)
    with_banner, without = render_frame(venue, t), render_frame(plain, t)
    left, right = int(10 + pan), int(40 + pan)
    assert np.allclose(with_banner[4:14, left:right], colour)
    outside = np.ones(with_banner.shape[:2], dtype=bool)
    outside[4:14, left:right] = False
    np.testing.assert_array_equal(with_banner[outside], without[outside])


def test_a_missing_dataset_says_how_to_make_one_to_try(tmp_path, monkeypatch, capsys):
    """Guards a new user running README's training command before its demo-data one: "dataset demo does not
    exist" said nothing about what a dataset is or where one comes from. The sentence names the forms and the
    command that makes one, and that command, as given, makes a dataset this reader accepts."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as missing:
        read_dataset(tmp_path / "demo")
    message = str(missing.value)
    assert message == (f"dataset {tmp_path / 'demo'} does not exist (a folder of clips with captions, or a .csv / "
                       f".jsonl; `slapgen demo-data {tmp_path / 'demo'}` makes a small one to try the commands on)")
    from trainer.cli import main

    assert main(["demo-data", str(tmp_path / "demo"), "--clips", "2"]) == 0
    assert len(read_dataset(tmp_path / "demo")) == 2
    # A typo of a dataset that is there is named as one (it sent a walk-through to demo-data), and a curation's
    # selected.jsonl, written only with --select, says so.
    with pytest.raises(DatasetError) as typo:
        read_dataset(tmp_path / "dmeo")
    assert str(typo.value) == f"dataset {tmp_path / 'dmeo'} does not exist (did you mean {tmp_path / 'demo'}?)"
    with pytest.raises(DatasetError) as unselected:
        read_dataset(tmp_path / "curation" / "selected.jsonl")
    assert str(unselected.value) == (f"dataset {tmp_path / 'curation' / 'selected.jsonl'} does not exist: `slapgen "
                                     f"curate DATASET --out {tmp_path / 'curation'} --select N` writes it, the best N clips")
