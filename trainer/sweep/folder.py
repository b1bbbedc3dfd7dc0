"""The sweep folder: what it holds, the sweep it belongs to (`sweep.json`), and who is running it.

`sweep.json` records the sweep's definition (config, --set, grid, data, held-out set, metrics, the
generation settings of generation metrics, --checkpoints / --generate-top / --pick-by, and every run's
validated config), written atomically before the first run starts. A rerun with the same command finds
the same definition and continues; a rerun with another grid, config, --set, data, metrics, generation
setting, --checkpoints or --generate-top is refused with one sentence that says what differs, before
anything changes. Another --pick-by measures nothing new: the rerun reports by it (and records it). A lock
(`flock`, released by the kernel even on SIGKILL) keeps two sweeps from running in one folder.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from slapgen.atomic import atomic_write_text
from trainer.config import TrainConfig
from trainer.errors import SweepError
from trainer.folder_lock import FolderLock
from trainer.sweep.evaluate import HELDOUT_LOSS, EvalSettings, metric_columns
from trainer.sweep.grid import Axis, PlannedRun

DEFINITION_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
CLIPS_FILE = "sweep_clips.json"  # the clips of --data and --heldout by content, as the runs were trained and judged on
RUNS_DIR = "runs"
CACHE_DIR = "latent-cache"
DEFINITION_FORMAT = 1
# What only changes the report, not what is trained or measured: a rerun may change it.
REPORT_ONLY = ("pick_by",)


def run_dir(out: Path, run: PlannedRun) -> Path:
    return Path(out) / RUNS_DIR / run.name


@dataclass(frozen=True)
class SweepDefinition:
    """Everything that decides what a sweep trains and how it is judged."""

    config: str
    sets: tuple[str, ...]
    axes: tuple[Axis, ...]
    data: str
    heldout: str
    metrics: tuple[str, ...]
    alpha_follows_rank: bool
    runs: tuple[PlannedRun, ...]
    evaluation: EvalSettings | None = None  # generation settings; None when only held-out loss is measured
    checkpoints: bool = False  # --checkpoints: every saved checkpoint of every run is a candidate
    generate_top: int | None = None  # --generate-top K: generation metrics for the K best by held-out loss only
    pick_by: str = HELDOUT_LOSS  # --pick-by: the metric that names the winner

    @property
    def columns(self) -> list[str]:
        """Every metric column of results.csv, held-out loss first."""
        return metric_columns(self.metrics, self.evaluation.clip_model if self.evaluation else None)

    def to_json(self) -> dict:
        # Generation settings (and --checkpoints, --generate-top, a --pick-by other than the default) are
        # recorded only when asked, so a sweep without them has the sweep.json it had before they existed.
        return {
            "format": DEFINITION_FORMAT,
            "grid": [{"key": axis.key, "values": list(axis.values)} for axis in self.axes],
            "config": self.config,
            "set": list(self.sets),
            "data": self.data,
            "heldout": self.heldout,
            "metrics": list(self.metrics),
            "alpha_follows_rank": self.alpha_follows_rank,
            **(self.evaluation.to_json() if self.evaluation else {}),
            **({"checkpoints": True} if self.checkpoints else {}),
            **({"generate_top": self.generate_top} if self.generate_top is not None else {}),
            **({"pick_by": self.pick_by} if self.pick_by != HELDOUT_LOSS else {}),
            "runs": [
                {"name": run.name, "values": run.values, "overrides": list(run.overrides),
                 "config": run.config.model_dump(mode="json")}
                for run in self.runs
            ],
        }

    @classmethod
    def from_json(cls, tree: dict) -> "SweepDefinition":
        return cls(
            config=tree["config"],
            sets=tuple(tree["set"]),
            axes=tuple(Axis(axis["key"], tuple(axis["values"])) for axis in tree["grid"]),
            data=tree["data"],
            heldout=tree["heldout"],
            metrics=tuple(tree["metrics"]),
            alpha_follows_rank=tree["alpha_follows_rank"],
            runs=tuple(
                PlannedRun(index, run["name"], dict(run["values"]), tuple(run["overrides"]),
                           TrainConfig.model_validate(run["config"]))
                for index, run in enumerate(tree["runs"])
            ),
            evaluation=EvalSettings.from_json(tree) if makes_videos(tree) else None,
            checkpoints=bool(tree.get("checkpoints", False)),
            generate_top=tree.get("generate_top"),
            pick_by=tree.get("pick_by", HELDOUT_LOSS),
        )

    def run(self, name: str) -> PlannedRun:
        for run in self.runs:
            if run.name == name:
                return run
        raise SweepError(f"this sweep has no run {name}")


def makes_videos(tree: dict) -> bool:
    """Whether the sweep.json `tree` records generation settings: its sweep has generation metrics."""
    return "seeds" in tree


def read_definition(out: Path) -> SweepDefinition:
    try:
        return SweepDefinition.from_json(read_definition_tree(out))
    except (KeyError, TypeError, ValueError) as error:
        raise _unreadable(out, type(error).__name__) from None


def read_definition_tree(out: Path) -> dict:
    """sweep.json as written, unvalidated: what a rerun compares with the command's. SweepError when it is not a
    JSON object."""
    try:
        tree = json.loads((Path(out) / DEFINITION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise _unreadable(out, type(error).__name__) from None
    if not isinstance(tree, dict):
        raise _unreadable(out, "not a JSON object")
    return tree


def _unreadable(out: Path, why: str) -> SweepError:
    return SweepError(f"{Path(out) / DEFINITION_FILE} is not a readable sweep definition ({why})")


def _grid_text(tree: dict) -> str:
    return " x ".join(f"{axis['key']}={','.join(axis['values'])}" for axis in tree["grid"])


# What a rerun must repeat, in the order a difference is reported, and how to say each one.
_COMPARED = (
    ("grid", "grid", _grid_text),
    ("config", "--config", lambda tree: tree["config"]),
    ("set", "--set", lambda tree: " ".join(tree["set"]) or "none"),
    ("data", "--data", lambda tree: tree["data"]),
    ("heldout", "--heldout", lambda tree: tree["heldout"]),
    ("metrics", "--metrics", lambda tree: ",".join(tree["metrics"])),
    ("seeds", "--seeds", lambda tree: ",".join(str(seed) for seed in tree["seeds"]) if makes_videos(tree) else "none"),
    ("eval_set", "--eval-set", lambda tree: " ".join(f"{k}={v}" for k, v in tree.get("eval_set", {}).items()) or "none"),
    ("eval_models", "evaluation model", lambda tree: ", ".join(f"{k} {v}" for k, v in tree.get("eval_models", {}).items())
     or "none"),
    ("checkpoints", "--checkpoints", lambda tree: "on" if tree.get("checkpoints") else "off"),
    ("generate_top", "--generate-top", lambda tree: str(tree.get("generate_top", "none"))),
)


def _with_settings_added_since(existing: dict, wanted: dict) -> dict:
    """`existing` with each run config given the settings added to slapgen since it was written, at their
    defaults (`config.with_settings_added_since`): a sweep started before them continues."""
    from trainer.config import with_settings_added_since

    runs, wanted_runs = existing.get("runs"), wanted.get("runs")
    if not (isinstance(runs, list) and isinstance(wanted_runs, list) and len(runs) == len(wanted_runs)):
        return existing
    filled = []
    for run, wanted_run in zip(runs, wanted_runs):
        if isinstance(run, dict) and isinstance(run.get("config"), dict) and isinstance(wanted_run.get("config"), dict):
            run = {**run, "config": with_settings_added_since(run["config"], wanted_run["config"])}
        filled.append(run)
    return {**existing, "runs": filled}


def _same_runs(existing: dict, wanted: dict) -> bool:
    """Whether two definitions train the same run configs, in whatever order and however their values were typed."""
    def configs(tree: dict) -> list[str] | None:
        runs = tree.get("runs")
        if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
            return None
        return sorted(json.dumps(run.get("config"), sort_keys=True) for run in runs)

    return configs(existing) is not None and configs(existing) == configs(wanted)


def difference(existing: dict, wanted: dict) -> str | None:
    """What differs between the definition in a folder and the one asked for (a phrase), or None;
    what only changes the report (`REPORT_ONLY`) is not a difference."""
    existing, wanted = ({k: v for k, v in tree.items() if k not in REPORT_ONLY} for tree in (existing, wanted))
    existing = _with_settings_added_since(existing, wanted)
    for key, label, say in _COMPARED:
        if existing.get(key) != wanted.get(key):
            try:
                before = say(existing)
            except (KeyError, TypeError):
                before = "unreadable"
            if key == "grid" and _same_runs(existing, wanted):  # `1e-2` for `0.01`, the axes in another order
                typed = " ".join(f"--grid {shlex.quote(axis['key'] + '=' + ','.join(axis['values']))}"
                                 for axis in existing["grid"])
                return (f"the same runs in another grid ({before}; now {say(wanted)}): run folders are named by the "
                        f"values as typed, so type the grid as it was: {typed}")
            return f"another {label} ({before}; now {say(wanted)})"
    if existing != wanted:
        return "other run configs (the preset or config file changed since it started, or the folder moved)"
    return None


def check_folder(out: Path, definition: SweepDefinition) -> bool:
    """Whether `out` already holds this sweep (False: new or empty). SweepError if it holds anything
    else (a file where the folder goes is the CLI's to say, for every command: `cli.check_out_is_a_folder`).
    Reads only: a refused command changes nothing."""
    out = Path(out)
    if (out / DEFINITION_FILE).is_file():
        different = difference(read_definition_tree(out), definition.to_json())
        if different is not None:
            raise SweepError(f"{out} holds a sweep with {different}; rerun it with the same command or choose another --out")
        return True
    if out.is_dir() and any(entry.name != LOCK_FILE for entry in out.iterdir()):
        raise SweepError(f"{out} is not empty and holds no {DEFINITION_FILE}; choose a new folder for the sweep")
    return False


def write_definition(out: Path, definition: SweepDefinition) -> None:
    """sweep.json, when new or when it differs (a rerun with another --pick-by records the one it reports by)."""
    path, text = Path(out) / DEFINITION_FILE, json.dumps(definition.to_json(), indent=2) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


def sweep_lock(out: Path) -> FolderLock:
    """Held for as long as the sweep runs (`trainer.folder_lock`): a second sweep into OUT is refused."""
    return FolderLock(out, LOCK_FILE, lambda folder: SweepError(
        f"another slapgen sweep is running in {folder}; wait for it or stop it"))


def check_clips(out: Path, clips: dict[str, dict[str, str]]) -> None:
    """SweepError when the clips of --data or --heldout differ from those the sweep's runs were trained and judged
    on (`CLIPS_FILE`, written by the first start): a rerun after a caption changed kept its finished runs, scored on
    the old held-out set, beside new ones. A sweep from before the record was kept is not checked."""
    from trainer.run_folder import clip_differences

    path = Path(out) / CLIPS_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(clips, indent=1) + "\n")
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or recorded == clips:
        return
    differ = [f"--{role}: {clip_differences(recorded.get(role) or {}, now)}" for role, now in clips.items()
              if recorded.get(role) != now]
    raise SweepError(f"the clips differ from those this sweep's runs were trained and judged on ({'; '.join(differ)}); "
                     "rerun it with them, or choose another --out for a sweep of these")
