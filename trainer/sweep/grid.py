"""The grid of a sweep: `--grid KEY=V1,V2,...` axes -> one validated `TrainConfig` per combination.

Every run's config is the preset (or YAML file), then `--set`, then the run's grid values, exactly as
`slapgen train --config C --set ...` would build it, so any config field can be an axis and every
combination is validated through `trainer.config` before anything runs. When `lora.rank` is an axis
and `lora.alpha` is neither an axis nor fixed with `--set`, alpha follows rank (alpha = rank, so the
update scale alpha / rank stays 1, as the research note's sweep does).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import TrainConfig, load_config, load_config_for_run
from trainer.errors import SweepError, TrainConfigError

RANK_KEY = "lora.rank"
ALPHA_KEY = "lora.alpha"
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9.=+_-]")


@dataclass(frozen=True)
class Axis:
    """One config field and the values it takes, as written on the command line."""

    key: str
    values: tuple[str, ...]

    @property
    def leaf(self) -> str:
        return self.key.rsplit(".", 1)[-1]

    def to_text(self) -> str:
        return f"{self.key}={','.join(self.values)}"


@dataclass(frozen=True)
class PlannedRun:
    """One combination: its folder name, its grid values (raw text), the overrides that make its config."""

    index: int
    name: str
    values: dict[str, str]
    overrides: tuple[str, ...]
    config: TrainConfig = field(compare=False)


def split_values(text: str) -> list[str]:
    """`1e-4,5e-4` -> ['1e-4', '5e-4']; commas inside [...] or {...} stay (`[to_q,to_k],[to_v]`)."""
    values, depth, current = [], 0, []
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    values.append("".join(current).strip())
    return values


def parse_axis(text: str) -> Axis:
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator or not key or not raw.strip():
        raise SweepError(f"--grid {text}: expected KEY=V1,V2,..., e.g. --grid lora.rank=64,128,256")
    values = split_values(raw)
    if any(not value for value in values):
        raise SweepError(f"--grid {text}: a value is empty")
    if len(set(values)) != len(values):
        raise SweepError(f"--grid {text}: a value is listed twice")
    return Axis(key, tuple(values))


def alpha_follows_rank(axes: list[Axis], sets: list[str]) -> bool:
    keys = {axis.key for axis in axes}
    fixed = {item.partition("=")[0].strip() for item in sets}
    return RANK_KEY in keys and ALPHA_KEY not in keys and ALPHA_KEY not in fixed


def _name_parts(axes: list[Axis]) -> list[str]:
    leaves = [axis.leaf for axis in axes]
    return [axis.leaf if leaves.count(axis.leaf) == 1 else axis.key for axis in axes]


def run_name(index: int, axes: list[Axis], values: tuple[str, ...]) -> str:
    parts = "_".join(f"{label}={value}" for label, value in zip(_name_parts(axes), values))
    return _UNSAFE_NAME_CHARS.sub("-", f"{index:02d}-{parts}")


def plan_runs(config: str, sets: list[str], axes: list[Axis], latent_cache: Path,
              resolve_models: bool = True) -> list[PlannedRun]:
    """Every combination of the axes (the first axis varies slowest), each config validated now.

    A run without a `latent_cache` of its own gets `latent_cache`, the folder every run shares. Without
    `resolve_models`, a model only a download identifies is not downloaded (its preset values may then be the
    default family's): for a check of what was typed."""
    if not axes:
        raise SweepError("give at least one --grid KEY=V1,V2,...")
    keys = [axis.key for axis in axes]
    for key in keys:
        if keys.count(key) > 1:
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid")
    fixed = {item.partition("=")[0].strip() for item in sets}
    for key in keys:
        if key in fixed:
            raise SweepError(f"{key} is both a grid axis and fixed with --set; drop one of them")
    follows = alpha_follows_rank(axes, sets)
    runs = []
    for index, values in enumerate(itertools.product(*(axis.values for axis in axes))):
        grid = [f"{key}={value}" for key, value in zip(keys, values)]
        if follows:
            grid.append(f"{ALPHA_KEY}={dict(zip(keys, values))[RANK_KEY]}")
        try:
            # without resolve_models (a check of what was typed), nothing is downloaded
            run_config = (load_config_for_run if resolve_models else load_config)(config, [*sets, *grid])
        except TrainConfigError as error:
            raise SweepError(f"grid point {', '.join(grid)}: {error}") from None
        if run_config.latent_cache is None:
            run_config = run_config.model_copy(update={"latent_cache": latent_cache})
        runs.append(PlannedRun(index, run_name(index, axes, values), dict(zip(keys, values)), tuple(grid), run_config))
    check_one_objective(runs)
    return runs


def check_one_objective(runs: list[PlannedRun]) -> None:
    """SweepError unless every run trains the same objective and trigger word: a TIC-FT layout (or plain
    text-to-video) defines what the held-out loss measures, the trigger word what its captions say, and the base
    model is measured once for all runs."""
    first = runs[0].config.objective
    for run in runs[1:]:
        if run.config.objective != first:
            raise SweepError(f"run {run.name} trains {run.config.objective} and run {runs[0].name} {first}: their held-out "
                             "losses measure different objectives; sweep each layout separately")
    trigger = runs[0].config.data.trigger_word
    for run in runs[1:]:
        if run.config.data.trigger_word != trigger:
            raise SweepError(f"run {run.name} has trigger word {run.config.data.trigger_word!r} and run {runs[0].name} "
                             f"{trigger!r}: the held-out captions (and prompts) of a sweep are one set for every run "
                             "and the base model; sweep each trigger word separately")
