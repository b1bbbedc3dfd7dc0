"""What a run folder holds, and whether a new `slapgen train` may start in it.

A run folder that already holds training (the final LoRA, a checkpoint, logged steps) is never
silently started over: that would overwrite the LoRA and checkpoints and log steps 1-N a second
time. A new start there needs `--resume latest` (continue it) or `--overwrite` (start over), and
`--overwrite` removes exactly what a run writes (`RUN_OUTPUTS`) and nothing else; the latent cache
stays, because its entries are keyed by everything they were encoded from and are reused safely.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import yaml

from slapgen.models.lora_format import WEIGHTS_FILE as LORA_FILENAME
from slapgen.atomic import atomic_write_text
from slapgen.errors import counted, first_names
from slapgen.names import NAME_PATTERN, NAME_RULE
from trainer import checkpoints
from trainer.errors import TrainError
from trainer.folder_lock import FolderLock

CONFIG_FILE = "config.yaml"
CLIPS_FILE = "clips.json"  # the clips the run trains on, by name and content (`check_resume_clips`)
METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"  # TensorBoard
VALIDATION_DIR = "validation"
# Everything a training run writes into its folder but the latent cache.
RUN_OUTPUTS = (LORA_FILENAME, checkpoints.CHECKPOINTS_DIR, METRICS_FILE, LOGS_DIR, VALIDATION_DIR, CONFIG_FILE,
               CLIPS_FILE)


def last_logged_step(run_dir: Path) -> int:
    """The step of the last complete line of the run's metrics.jsonl (0 when none). Steps only grow in the
    file (a resume first cuts it back to its checkpoint's step, --overwrite empties the folder), so this is
    also the highest step logged. The one reader for both callers: the refusal to start over a run, and a
    sweep's progress bars, which read every running run's file from outside its process each tick, so only
    the file's tail is read (all of it only when the last line is longer than the tail)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            for tail in (4096, size):
                handle.seek(max(0, size - tail))
                for line in reversed(handle.read().decode("utf-8", errors="replace").splitlines()):
                    try:
                        return int(json.loads(line)["step"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a kill, still being written, or cut at the tail's start
                if tail >= size:
                    break
    except OSError:
        return 0
    return 0


def training_found(run_dir: Path, saved: list[Path]) -> list[str]:
    """What earlier training left in `run_dir` (`saved`: its checkpoints), in words (empty: nothing a new
    start would destroy)."""
    run_dir = Path(run_dir)
    found = []
    if (run_dir / LORA_FILENAME).is_file():
        found.append(f"the final {LORA_FILENAME}")
    if saved:
        found.append(f"{counted(len(saved), 'checkpoint')} (the latest {saved[-1].name})")
    logged = last_logged_step(run_dir)
    if logged:
        found.append(f"metrics up to step {logged}")
    return found


TRAIN_LOCK = ".train.lock"  # in the run folder, while a launch trains in it
# Where launchers put a process's rank (torchrun's RANK, MPI's), read in this order as accelerate's
# `get_int_from_env` reads them; here without accelerate, which imports torch (`slapgen train` checks first).
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def first_process() -> bool:
    """Whether this is the launch's first process, known before accelerate's state is (a PartialState made early,
    before the CPU flag is read, had each of two CPU processes take itself for the first): the one that holds the
    run folder's lock."""
    for name in RANK_VARIABLES:
        rank = int(os.environ.get(name, -1))
        if rank >= 0:
            return rank == 0
    return True


def train_lock(run_dir: Path) -> FolderLock:
    """The lock `slapgen train` holds on its run folder (the launch's main process): a second start there is
    refused in one sentence."""
    return FolderLock(run_dir, TRAIN_LOCK, lambda folder: TrainError(
        f"another slapgen train is running in {folder}; wait for it or stop it, or train into another --out"))


def check_out_folder(run_dir: Path, data: Path) -> None:
    """TrainError when `--out` is a place a run folder breaks something: inside a folder dataset (`--out` equal to
    `--data` trained, then the next run read its validation videos as clips without captions), or inside another
    run's checkpoints, validation or logs folder (which that run prunes, rewrites or deletes)."""
    out = Path(run_dir).absolute().resolve()
    data = Path(data).absolute().resolve()
    if data.is_dir() and not (data / "videos.txt").is_file() and out.is_relative_to(data):
        raise TrainError(f"--out {run_dir} is inside the dataset {data}, which reads every video under it: the run's "
                         "validation videos would become clips without captions; choose an --out outside it "
                         "(e.g. runs/NAME)")
    for folder in out.parents:
        if folder.name in (checkpoints.CHECKPOINTS_DIR, VALIDATION_DIR, LOGS_DIR) and \
                (folder.parent / CONFIG_FILE).is_file():
            raise TrainError(f"--out {run_dir} is inside the {folder.name} folder of the run {folder.parent}, "
                             "which that run prunes, rewrites or deletes; choose an --out of its own (e.g. runs/NAME)")


def check_new_start(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """TrainError (one sentence, naming the fix) when starting from step 0 in `run_dir` would destroy a run, or
    when `resume` names no checkpoint there is (said before the clips are encoded: `--resume latest` in a folder
    without one encoded every clip first, then refused)."""
    if resume is not None and overwrite:
        raise TrainError("--resume continues a run and --overwrite deletes it: give one of them")
    if resume is not None:
        checkpoints.check_resume(run_dir, resume)
    if resume is not None or overwrite:
        return
    saved = checkpoints.list_checkpoints(run_dir)
    found = training_found(run_dir, saved)
    if not found:
        return
    fix = ("continue it with --resume latest, or start over with --overwrite" if saved
           else "start over with --overwrite (it has no checkpoint to resume from)")
    raise TrainError(f"{run_dir} already holds a run ({', '.join(found)}); {fix}, or choose another --out")


_UNSET = object()  # a key one side of a comparison does not have


def _differences(before: object, now: object, key: str = "") -> list[str]:
    """Where two config mappings differ, as dotted keys with both values (recursing while both sides are
    mappings; a section that is null on one side is one difference)."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = [*before, *(name for name in now if name not in before)]
        return [line for name in keys
                for line in _differences(before.get(name, _UNSET), now.get(name, _UNSET), f"{key}.{name}" if key else name)]
    if before == now:
        return []
    said = ["unset" if value is _UNSET else json.dumps(value) for value in (before, now)]
    return [f"{key}: {said[0]} in the run, {said[1]} now"]


def config_differences(saved_yaml: str, new_yaml: str) -> list[str]:
    """Each setting on which the run's saved config.yaml and the new start's config differ, in words
    (`train.max_train_steps: 10 in the run, 20 now`), in the config's order; values as JSON, so a
    string and a number that print alike still read apart."""
    from trainer.config import with_settings_added_since

    now = yaml.safe_load(new_yaml) or {}
    return _differences(with_settings_added_since(yaml.safe_load(saved_yaml) or {}, now), now)


# The differences a refusal names before it says how many more there are.
DIFFERENCES_SHOWN = 3


def check_resume_config(run_dir: Path, config_yaml: str) -> None:
    """TrainError (one sentence) when `--resume` is given a config other than the run's own config.yaml: it
    names the settings that differ with both values, and says that a resume continues the run's own
    schedule, so that training a finished run longer is a new run (the usual wish behind a changed
    train.max_train_steps)."""
    saved = Path(run_dir) / CONFIG_FILE
    if not saved.is_file() or saved.read_text() == config_yaml:
        return
    differences = config_differences(saved.read_text(), config_yaml)
    if not differences:
        return  # the same settings written differently (an older dump's layout): nothing a resume would change
    shown = "; ".join(differences[:DIFFERENCES_SHOWN])
    more = len(differences) - DIFFERENCES_SHOWN
    if more > 0:
        shown += f"; and {more} more"
    raise TrainError(
        f"the config differs from the run's {saved} ({shown}): --resume continues that run with its own config and "
        f"schedule, so resume with the same config (--config "
        f"{saved}); to train further, start a new run with another --out and the settings you want (a new run "
        f"trains a new LoRA from the base model: the trainer has no option to start from an existing LoRA)")


def check_resume_clips(run_dir: Path, clips: list[tuple[str, str]], data: Path) -> None:
    """TrainError (one sentence) when a resume would train on other clips than the run's `CLIPS_FILE` records:
    `clips` are this start's (name, content) pairs in training order (`CacheEntry.content`: the file, the caption
    and a condition file, not the model or cache format, which an upgrade may change). A resume with another
    --data, or after a clip or caption changed, trained on without a word (and exact resume assumes the same
    batches). A run from before the record was kept is not checked."""
    saved = Path(run_dir) / CLIPS_FILE
    try:
        recorded = json.loads(saved.read_text(encoding="utf-8"))
        before = {name: content for name, content in recorded["clips"]}
    except (OSError, ValueError, KeyError, TypeError):
        return
    if [list(pair) for pair in clips] == recorded["clips"]:
        return
    raise TrainError(f"the clips differ from the run's ({clip_differences(before, dict(clips))}; --data {data} now, "
                     f"{recorded.get('data')} in the run): --resume continues that run on its own clips, so resume with "
                     "them; to train on these, start a new run with another --out")


def clip_differences(before: dict[str, str], now: dict[str, str]) -> str:
    """How two sets of clips ({name: content}) differ, in words: added, gone, changed in content or caption."""
    gone = [name for name in before if name not in now]
    added = [name for name in now if name not in before]
    changed = [name for name in now if name in before and now[name] != before[name]]
    said = [f"{len(names)} {what} ({first_names(names)})"
            for names, what in ((added, "added"), (gone, "gone"), (changed, "changed in content or caption")) if names]
    return "; ".join(said) or "the same clips in another order"


def record_clips(run_dir: Path, clips: list[tuple[str, str]], data: Path) -> None:
    """Write `CLIPS_FILE`: the dataset and the clips a run trains on, for `check_resume_clips`."""
    atomic_write_text(Path(run_dir) / CLIPS_FILE, json.dumps({"data": str(data), "clips": [list(pair) for pair in clips]},
                                                             indent=1) + "\n")


def where_to_look_next(run_dir: Path, model: str, tensorboard: bool, ticft: bool = False) -> list[str]:
    """The lines `slapgen train` ends with after the LoRA's: what a user looks at next, only what this run
    wrote (its last validation videos, metrics.jsonl, the TensorBoard command when it logged there) and how to
    serve it, in one line (a TIC-FT LoRA's with the image every request needs). Paths as `run_dir` was given, so
    they work from where the command ran; the adapters folder absolute, since `bentoml serve` reads it from the
    service's folder."""
    run_dir = Path(run_dir)
    lines = []
    videos = sorted(path for path in (run_dir / VALIDATION_DIR).glob("step-*") if path.is_dir())
    if videos:
        earlier = f"; earlier steps' beside it in {run_dir / VALIDATION_DIR}" if len(videos) > 1 else ""
        lines.append(f"validation videos: {videos[-1]} (the final LoRA's{earlier})")
    if (run_dir / METRICS_FILE).is_file():
        lines.append(f"metrics: {run_dir / METRICS_FILE} (a JSON line per logged step)")
    if tensorboard and (run_dir / LOGS_DIR).is_dir():
        lines.append(f"TensorBoard: tensorboard --logdir {shlex.quote(str(run_dir / LOGS_DIR))}")
    name = run_dir.absolute().name
    if NAME_PATTERN.fullmatch(name):
        image = (' with "condition_image", the frame to animate (base64 PNG or JPEG); or `slapgen generate --adapter '
                 f'{shlex.quote(str(run_dir))} --condition-image IMAGE`') if ticft else ""
        lines.append(f"serve it: SLAP_MODEL={shlex.quote(model)} SLAP_ADAPTERS_DIR="
                     f"{shlex.quote(str(run_dir.absolute().parent))} bentoml serve {serve_target()}, then ask "
                     f'for "adapter": "{name}"{image}')
    else:  # the served folder's adapters are named after their folders; this one's name is not an adapter name
        lines.append(f"serve it: upload it to a running server as a name of {NAME_RULE}: curl -X POST "
                     f'http://127.0.0.1:3000/adapters/upload -H "Authorization: Bearer $SLAP_API_TOKEN" -F name=NAME '
                     f"-F file=@{shlex.quote(str(run_dir / LORA_FILENAME))}")
    return lines


def serve_target() -> str:
    """What follows `bentoml serve` in the lines that say how to serve: the folder of the service this trainer
    belongs to (`service.py` and `bentofile.yaml`, the repository root), which `bentoml serve PATH` serves from
    anywhere. "(in the slapgen folder)" sent a walk-through into the `slapgen/` package folder, where bentoml found
    no service. Installed without the repository, where the service's folder is not known, said as such."""
    root = Path(__file__).resolve().parents[1]
    if (root / "service.py").is_file() and (root / "bentofile.yaml").is_file():
        return shlex.quote(str(root))
    return "(in the folder with service.py and bentofile.yaml)"


def after_interrupt(run_dir: Path, overwrite: bool = False, resume: str | None = None) -> str:
    """What to type after a Ctrl-C of `slapgen train --out run_dir [--overwrite | --resume R]`, from what the folder
    holds: `--resume latest` only when there is a checkpoint (it was said after a Ctrl-C during the clips' encoding,
    and then refused), in place of `--overwrite` (the two together are refused), and not again to a command that
    has it."""
    saved = checkpoints.list_checkpoints(run_dir)
    if saved:
        how = ("run the same command" if resume == "latest" else "replace --overwrite with --resume latest" if overwrite
               else f"replace --resume {resume} with --resume latest" if resume else "add --resume latest")
        return f"{how} to continue from {saved[-1].name}"
    if training_found(run_dir, saved):
        return "no checkpoint was saved yet: rerun with --overwrite to start again (the encoded clips are kept)"
    return "rerun the same command: the clips encoded so far are kept"


def clear_run(run_dir: Path) -> None:
    """`--overwrite`: remove what an earlier run wrote (`RUN_OUTPUTS`); the latent cache and any other file stay."""
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def names_in(run_dir: Path) -> set[str] | None:
    """What `run_dir` holds before a start (None: it is not there), for `remove_new` to undo a failed start."""
    run_dir = Path(run_dir)
    return {path.name for path in run_dir.iterdir()} if run_dir.is_dir() else None


def remove_new(run_dir: Path, existing: set[str] | None) -> None:
    """Undo a start that failed: remove `run_dir` if it did not exist (`existing` None), else the entries
    in it that are not in `existing` (the names it held before)."""
    run_dir = Path(run_dir)
    if existing is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for path in run_dir.iterdir() if run_dir.is_dir() else ():
        if path.name not in existing:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
