"""Read a captioned video dataset from any of the layouts users already have.

Layouts (picked from what `path` is):
- a folder with `videos.txt` + `prompts.txt` (diffusers' training scripts): line i pairs up;
- a `.csv` / `.jsonl` file with `video` and `caption` columns (paths relative to the file), and
  optionally `condition` (an image or clip a TIC-FT pairs dataset conditions that row on);
- a folder of `clip.mp4` + `clip.txt` pairs (searched recursively).

Two things a dataset handed to us may hold are never trusted:
- Text that is not UTF-8. A caption with undecodable bytes is a `DatasetError` naming its file when
  captions are required (training), and the clip's `caption_unreadable` issue otherwise (curation).
  Files are decoded with `surrogateescape`, so one bad caption in a csv or prompts.txt spoils only
  its own row.
- Links out of the dataset. A video or caption file is read only if, with every symbolic link
  followed, it stays inside the dataset folder (for a path a listing names outside that folder, as
  curation's selected.jsonl does, inside the folder the path names): a link elsewhere inside is
  followed like the file itself. One that leads out is a `DatasetError` for training and the issue
  `outside_dataset` (video) or `caption_outside_dataset` for curation; its content is never read.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from slapgen.errors import closest_path_hint, first_names
from trainer.errors import DatasetError
from trainer.trigger_word import PLACEHOLDER, with_trigger_word

# What `slapgen curate --out DIR` writes (trainer/curate/run.py): a dataset reader knows a selection by them.
CURATE_SELECTION = "selected.jsonl"
CURATE_REPORT = "report.json"
CURATE_PAGE = "report.html"

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
VIDEO_COLUMN, CAPTION_COLUMN, CONDITION_COLUMN = "video", "caption", "condition"
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
SHOWN_PROBLEMS = 5  # of a dataset's rows that cannot be used, named in its one error
CAPTION_PROBLEMS = {"caption_unreadable": "is not valid UTF-8", "caption_outside_dataset": "is a link out of the dataset folder"}


@dataclass(frozen=True)
class Clip:
    """One dataset row: the file, its caption, and the name the dataset gives the video."""

    video: Path
    caption: str | None
    name: str
    issues: tuple[str, ...] = ()  # what was refused while reading (only without require_files / require_captions)
    condition: Path | None = None  # a TIC-FT pairs dataset's condition image or clip for this row


@dataclass(frozen=True)
class _Row:
    name: str  # the video's path as the dataset writes it
    caption: str | None  # undecodable bytes survive as lone surrogates (see _UNDECODABLE)
    source: str  # where the row is, for messages: "data.csv line 3"
    caption_source: str  # the file (and line) the caption comes from
    caption_issue: str | None = None  # a caption file that was not read (a link out of the dataset)
    condition: str | None = None  # the `condition` column, as written
    caption_file: str | None = None  # a folder dataset's caption file for this video, when there is none


def check_dataset_exists(path: Path) -> Path:
    """`path`, or the sentence for a dataset that is not there: the first thing a new user meets when README's
    commands are run out of order (`--data demo`). Commands say it before their seconds of imports."""
    path = Path(path)
    if not path.exists():
        if close := closest_path_hint(path):  # `dmeo` for `demo`: the typo, not demo-data
            raise DatasetError(f"dataset {path} does not exist{close}")
        if path.name == CURATE_SELECTION:  # curate writes it only when asked to select
            raise DatasetError(f"dataset {path} does not exist: `slapgen curate DATASET --out {path.parent} --select N` "
                               "writes it, the best N clips")
        raise DatasetError(f"dataset {path} does not exist (a folder of clips with captions, or a .csv / .jsonl; "
                           f"`slapgen demo-data {path}` makes a small one to try the commands on)")
    return path


def check_caption_folder(path: Path) -> Path:
    """`path`, or why `slapgen caption` cannot write captions into it: it writes clip.txt beside each clip.mp4,
    which a .csv / .jsonl or a videos.txt + prompts.txt dataset does not read."""
    path = Path(path)
    if not path.is_dir() or (path / "videos.txt").exists() or (path / "prompts.txt").exists():
        raise DatasetError(f"{path} is not a folder of clips; caption writes clip.txt beside each clip.mp4, "
                           "so give it a folder of videos")
    return path


def read_dataset(path: Path, require_captions: bool = True, require_files: bool = True) -> list[Clip]:
    """Every clip of the dataset at `path`, in dataset order.

    With `require_captions`, a missing, empty or unreadable caption is a `DatasetError` naming the clip;
    without it (curation), such clips come back with `caption=None` (and an issue when unreadable). A
    video file that does not exist or leads out of the dataset is an error unless `require_files` is
    off (curation reports it instead).
    """
    path = check_dataset_exists(path)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            rows = _csv_rows(path)
        elif path.suffix.lower() == ".jsonl":
            rows = _jsonl_rows(path)
        else:
            raise DatasetError(f"dataset file {path} must be .csv or .jsonl with 'video' and 'caption' columns")
        root = path.parent
    elif (path / "videos.txt").is_file() or (path / "prompts.txt").is_file():
        rows, root = _txt_pair_rows(path), path
    else:
        rows, root = _folder_pair_rows(path), path
        if not rows:  # say what a clip is: a folder of stills or of .gif files is a common first try
            raise DatasetError(f"dataset {path} holds no clips: no video file ({', '.join(VIDEO_SUFFIXES)}) in it or "
                               "its subfolders, and no videos.txt + prompts.txt")
    clips, problems, uncaptioned = [], [], []
    for row in rows:  # every row's problem at once: a walk-through fixed three, one per start of `train`
        try:
            # an uncaptioned clip is opened to tell a corrupt one (skipped, as `slapgen caption` leaves it) from one to
            # caption; past a few the dataset is refused anyway, and each is an ffmpeg start (200 took 12 s)
            clips.append(_clip(root, row, require_captions, require_files,
                               probe_uncaptioned=len(uncaptioned) < SHOWN_PROBLEMS))
        except MissingCaption as error:
            uncaptioned.append(error)
        except DatasetError as error:
            problems.append(str(error))
    total = len(problems) + len(uncaptioned)
    if len(uncaptioned) == 1:
        problems.append(str(uncaptioned[0]))
    elif uncaptioned:  # one sentence for them all, not the same advice again and again
        problems.append(f"{len(uncaptioned)} videos have no caption ({first_names([e.video for e in uncaptioned])}): "
                        f"write a .txt beside each, or caption the clips that have none with `slapgen caption {root}`")
    if total == 1:
        raise DatasetError(problems[0])
    if problems:
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more problems" if len(problems) > SHOWN_PROBLEMS else ""
        # A few bad clips of thousands stopped the whole dataset, with no way on but fixing each (a walk-through's 25
        # of 2,550): curate lists them, and writes the usable clips as a dataset of their own.
        raise DatasetError(f"{total} clips of {path} cannot be used: {'; '.join(problems[:SHOWN_PROBLEMS])}{more} "
                           f"(`slapgen curate {path} --out DIR --select usable` reports every clip's problems and writes "
                           "the clips training can read to DIR/selected.jsonl, a dataset --data takes)")
    if not clips:
        said = "holds no clips" if path.is_dir() else "lists no clip"
        if path.is_file() and (path.parent / CURATE_REPORT).is_file():  # curate's selection: it says why none
            said += (f" (curate selected none: its summary, and {path.parent / CURATE_PAGE}, say why; too_short "
                     "depends on --config)")
        raise DatasetError(f"dataset {path} {said}")
    return clips


class MissingCaption(DatasetError):
    """A video of a folder dataset with no caption file beside it (grouped with the others in one sentence)."""

    def __init__(self, message: str, video: str):
        super().__init__(message)
        self.video = video


def read_training_clips(path: Path, max_clips: int | None = None, trigger_word: str | None = None) -> list[Clip]:
    """The clips a run trains or is judged on: `read_dataset`, the first `max_clips`, each caption with the
    run's trigger word (`trainer.trigger_word`). A caption holding `[trigger]` in a run without a trigger word
    is refused: it would train on the placeholder itself."""
    clips = read_dataset(Path(path))[:max_clips]
    if trigger_word is None:
        marked = next((clip for clip in clips if PLACEHOLDER in (clip.caption or "")), None)
        if marked is not None:
            raise DatasetError(f"the caption of {marked.name} holds {PLACEHOLDER}, but this run has no trigger word: "
                               "set data.trigger_word (--set data.trigger_word=WORD to train or sweep; slapgen eval: "
                               "--trigger-word WORD), or edit the caption")
        return clips
    return [replace(clip, caption=with_trigger_word(clip.caption or "", trigger_word)) for clip in clips]


def _clip(root: Path, row: _Row, require_captions: bool, require_files: bool, probe_uncaptioned: bool = True) -> Clip:
    if not row.name:
        raise DatasetError(f"{row.source}: empty video path")
    if _UNDECODABLE.search(row.name):
        raise DatasetError(f"{row.source}: the video path is not valid UTF-8")
    issues = []
    video, inside = _resolve(root, row.name)
    if not inside:
        if require_files:
            raise DatasetError(f"{row.source}: video {row.name} is a link out of the dataset folder")
        issues.append("outside_dataset")
    elif require_files and not video.is_file():
        raise DatasetError(f"{row.source}: video {row.name} not found (looked in {video})")
    caption, caption_issue = row.caption, row.caption_issue
    if caption and _UNDECODABLE.search(caption):
        caption, caption_issue = None, "caption_unreadable"
    if caption_issue:
        if require_captions:
            raise DatasetError(f"{row.caption_source}: caption of {row.name} {CAPTION_PROBLEMS[caption_issue]}")
        issues.append(caption_issue)
    caption = caption.strip() if caption else None
    if require_captions and row.caption_file:
        from trainer.frames import opens

        if require_files and probe_uncaptioned and not opens(video):
            # `slapgen caption` writes no caption for a clip ffmpeg cannot open, so a run stopped on its missing
            # caption and caption's rerun left it so (a walk-through's loop): such a clip comes through uncaptioned
            # and the latent cache skips it as corrupt, as it does a captioned one.
            return Clip(video=video, caption=None, name=row.name, issues=("corrupt",),
                        condition=_condition(root, row, require_files))
        raise MissingCaption(f"video {row.name} has no caption: write {row.caption_file} beside it, or caption the "
                             f"clips that have none with `slapgen caption {root}`", row.name)
    if require_captions and not caption:
        raise DatasetError(f"{row.source}: video {row.name} has an empty caption")
    return Clip(video=video, caption=caption or None, name=row.name, issues=tuple(issues),
                condition=_condition(root, row, require_files))


def _condition(root: Path, row: _Row, require_files: bool) -> Path | None:
    """The row's condition file, held to the same rules as its video; None when the row names none."""
    if not row.condition:
        return None
    if _UNDECODABLE.search(row.condition):
        raise DatasetError(f"{row.source}: the condition path is not valid UTF-8")
    condition, inside = _resolve(root, row.condition)
    if not inside:
        raise DatasetError(f"{row.source}: condition {row.condition} is a link out of the dataset folder")
    if require_files and not condition.is_file():
        raise DatasetError(f"{row.source}: condition {row.condition} not found (looked in {condition})")
    return condition


def _resolve(root: Path, name: str) -> tuple[Path, bool]:
    """The file `name` (relative to `root`) really is, and whether following links kept it inside the
    folder it was named in: `root`, or for a path a listing deliberately names outside `root`, the
    folder that path names. So a listing may point anywhere in plain sight; a link may not."""
    root = root.absolute()
    written = Path(os.path.normpath(root / name))
    folder = root if written.is_relative_to(root) else written.parent
    resolved = (root / name).resolve()
    return resolved, resolved.is_relative_to(folder.resolve())


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="surrogateescape")


def _check_columns(found: list[str] | None, source: Path) -> None:
    missing = [column for column in (VIDEO_COLUMN, CAPTION_COLUMN) if column not in (found or [])]
    if missing:
        raise DatasetError(
            f"{source} needs columns 'video' and 'caption'; missing {', '.join(map(repr, missing))} "
            f"(found: {', '.join(found or []) or 'none'})"
        )


def _csv_rows(path: Path) -> list[_Row]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        _check_columns(reader.fieldnames, path)
        rows = []
        for number, row in enumerate(reader, start=2):
            where = f"{path.name} line {number}"
            rows.append(_Row((row[VIDEO_COLUMN] or "").strip(), row[CAPTION_COLUMN], where, where,
                             condition=(row.get(CONDITION_COLUMN) or "").strip() or None))
        return rows


def _jsonl_rows(path: Path) -> list[_Row]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path.name} line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path.name} line {number} is not a JSON object")
        _check_columns(list(row), path)
        where = f"{path.name} line {number}"
        condition = str(row.get(CONDITION_COLUMN) or "").strip()
        rows.append(_Row(str(row[VIDEO_COLUMN]).strip(), row[CAPTION_COLUMN], where, where, condition=condition or None))
    return rows


def _txt_pair_rows(folder: Path) -> list[_Row]:
    for required in ("videos.txt", "prompts.txt"):
        if not (folder / required).is_file():
            raise DatasetError(f"{folder} has {'prompts.txt' if required == 'videos.txt' else 'videos.txt'} but no {required}")
        if not _resolve(folder, required)[1]:  # the listings themselves: no clip to blame, so always an error
            raise DatasetError(f"{folder / required} is a link out of the dataset folder")
    videos = _lines_without_trailing_blanks(folder / "videos.txt")
    prompts = _lines_without_trailing_blanks(folder / "prompts.txt")
    if len(prompts) != len(videos):
        raise DatasetError(f"{folder}: videos.txt has {len(videos)} lines but prompts.txt has {len(prompts)}")
    return [_Row(video, prompt, f"videos.txt line {n}", f"prompts.txt line {n}")
            for n, (video, prompt) in enumerate(zip(videos, prompts), start=1)]


def _lines_without_trailing_blanks(path: Path) -> list[str]:
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _folder_pair_rows(folder: Path) -> list[_Row]:
    rows = []
    # A link to a missing file is a row too (curation reports it, training names it), never passed over in silence.
    for video in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES
                        and (p.is_file() or (p.is_symlink() and not p.exists()))):
        name = video.relative_to(folder).as_posix()
        caption_file = video.with_suffix(".txt")
        caption_name = caption_file.relative_to(folder).as_posix()
        caption, issue, missing = None, None, None
        if not caption_file.is_file():
            missing = caption_name
        elif _resolve(folder, caption_name)[1]:
            caption = _read_text(caption_file)
        else:
            issue = "caption_outside_dataset"  # never opened: its text must not reach a report
        rows.append(_Row(name, caption, name, caption_name, issue, caption_file=missing))
    return rows


def unread_entries(path: Path) -> list[dict]:
    """What a folder dataset holds that no clip row reads, so a report can name it: links to folders (not
    followed, as `rglob` does not follow them) and captions with no video beside them (a video renamed, or
    of a kind not in VIDEO_SUFFIXES). [{"path": relative path, "why": sentence}]; none for a listing (.csv,
    .jsonl, videos.txt + prompts.txt), which names its rows itself."""
    path = Path(path)
    if not path.is_dir() or (path / "videos.txt").is_file() or (path / "prompts.txt").is_file():
        return []
    unread = []
    for folder, subfolders, files in os.walk(path):
        here = Path(folder)
        for name in sorted(subfolders):
            if (here / name).is_symlink():
                unread.append({"path": (here / name).relative_to(path).as_posix() + "/",
                               "why": "a link to a folder, not followed: list its clips in a .csv or .jsonl, or copy them in"})
        stems = {Path(name).stem for name in files if Path(name).suffix.lower() in VIDEO_SUFFIXES}
        for name in sorted(files):
            if Path(name).suffix == ".txt" and Path(name).stem not in stems:
                unread.append({"path": (here / name).relative_to(path).as_posix(),
                               "why": f"a caption with no video beside it ({', '.join(VIDEO_SUFFIXES)})"})
    return unread
