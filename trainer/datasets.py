"""Read a captioned video dataset from any of the layouts users already have.

Layouts (picked from what `path` is):
- a folder with `videos.txt` + `prompts.txt` (diffusers' training scripts): line i pairs up;
- a `.csv` / `.jsonl` file with `video` and `caption` columns (paths relative to the file);
- a folder of `clip.mp4` + `clip.txt` pairs (searched recursively).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import DatasetError

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
VIDEO_COLUMN, CAPTION_COLUMN = "video", "caption"


@dataclass(frozen=True)
class Clip:
    """One dataset row: the file, its caption, and the name the dataset gives the video."""

    video: Path
    caption: str | None
    name: str


def read_dataset(path: Path, require_captions: bool = True, require_files: bool = True) -> list[Clip]:
    """Every clip of the dataset at `path`, in dataset order.

    With `require_captions`, a missing or empty caption is a `DatasetError` naming the clip;
    without it (curation), such clips come back with `caption=None`. A video file that does not
    exist is an error unless `require_files` is off (curation reports it as unreadable instead).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
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
    clips = [_clip(root, name, caption, source, require_captions, require_files) for name, caption, source in rows]
    if not clips:
        raise DatasetError(f"dataset {path} holds no clips")
    return clips


def _clip(root: Path, name: str, caption: str | None, source: str, require_captions: bool, require_files: bool) -> Clip:
    if not name:
        raise DatasetError(f"{source}: empty video path")
    video = (root / name).resolve()
    if require_files and not video.is_file():
        raise DatasetError(f"{source}: video {name} not found (looked in {video})")
    caption = caption.strip() if caption else None
    if require_captions and not caption:
        raise DatasetError(f"{source}: video {name} has an empty caption")
    return Clip(video=video, caption=caption or None, name=name)


def _check_columns(found: list[str] | None, source: Path) -> None:
    missing = [column for column in (VIDEO_COLUMN, CAPTION_COLUMN) if column not in (found or [])]
    if missing:
        raise DatasetError(
            f"{source} needs columns 'video' and 'caption'; missing {', '.join(map(repr, missing))} "
            f"(found: {', '.join(found or []) or 'none'})"
        )


def _csv_rows(path: Path) -> list[tuple[str, str | None, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        _check_columns(reader.fieldnames, path)
        return [
            ((row[VIDEO_COLUMN] or "").strip(), row[CAPTION_COLUMN], f"{path.name} line {number}")
            for number, row in enumerate(reader, start=2)
        ]


def _jsonl_rows(path: Path) -> list[tuple[str, str | None, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path.name} line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path.name} line {number} is not a JSON object")
        _check_columns(list(row), path)
        rows.append((str(row[VIDEO_COLUMN]).strip(), row[CAPTION_COLUMN], f"{path.name} line {number}"))
    return rows


def _txt_pair_rows(folder: Path) -> list[tuple[str, str | None, str]]:
    for required in ("videos.txt", "prompts.txt"):
        if not (folder / required).is_file():
            raise DatasetError(f"{folder} has {'prompts.txt' if required == 'videos.txt' else 'videos.txt'} but no {required}")
    videos = _lines_without_trailing_blanks(folder / "videos.txt")
    prompts = _lines_without_trailing_blanks(folder / "prompts.txt")
    if len(prompts) != len(videos):
        raise DatasetError(f"{folder}: videos.txt has {len(videos)} lines but prompts.txt has {len(prompts)}")
    return [(video, prompt, f"videos.txt line {n}") for n, (video, prompt) in enumerate(zip(videos, prompts), start=1)]


def _lines_without_trailing_blanks(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _folder_pair_rows(folder: Path) -> list[tuple[str, str | None, str]]:
    rows = []
    for video in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        caption_file = video.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8") if caption_file.is_file() else None
        name = video.relative_to(folder).as_posix()
        rows.append((name, caption, name))
    return rows
