"""Several `slapgen eval` results computed apart, as one: what a sweep's report.html is made of.

A sweep evaluates each run's LoRA in the run's own process (one per GPU with several) and the base
model once, each an ordinary `run_eval` result with its own eval.json and videos. `combine` puts
them side by side as if one eval had compared them: systems renamed (each part's `lora` becomes the
run's name), video paths made relative to the combined folder, per-clip held-out losses measured
elsewhere added, and the A/B against `base` recomputed from the per-video numbers with the code
`slapgen eval` uses. Parts must share the model, held-out set, prompts, seeds and generation
settings; anything else would compare different things and is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.errors import EvalError
from trainer.evaluate.names import FVD, HELDOUT_LOSS
from trainer.evaluate.options import BASE
from trainer.evaluate.run import FORMAT, Video, ab_vs_base

SHARED = ("model", "heldout", "seeds", "generation")


@dataclass(frozen=True)
class Part:
    result: dict  # a `run_eval` result (eval.json)
    folder: Path  # where it was written: its video paths are relative to it
    names: dict[str, str]  # its system names -> their names in the combined result


def combine(parts: list[Part], out: Path, losses: dict[str, list[float]] | None = None,
            loss_definition: dict | None = None) -> dict:
    """One result for `report.write_reports(result, out)`. `losses`: per-clip held-out losses by combined
    system name (every system, `base` included, or None), defined by `loss_definition`."""
    first = parts[0].result
    for part in parts[1:]:
        for key in SHARED:
            if part.result[key] != first[key]:
                raise EvalError(f"the evaluations in {parts[0].folder} and {part.folder} differ in {key}; "
                                "they cannot be compared side by side")
        if [p["caption"] for p in part.result["prompts"]] != [p["caption"] for p in first["prompts"]]:
            raise EvalError(f"the evaluations in {parts[0].folder} and {part.folder} used other prompts")
    out = Path(out)
    definitions = ({HELDOUT_LOSS: loss_definition} if losses else {}) | first["metric_definitions"]
    per_video = [name for name in definitions if name not in (HELDOUT_LOSS, FVD)]
    videos, systems = [], {}
    for part in parts:
        for video in part.result["videos"]:
            scores = {name: video[name] for name in per_video}
            path = Path(os.path.relpath(Path(part.folder) / video["path"], out))
            videos.append(Video(part.names[video["system"]], video["prompt"], video["seed"], path, scores))
        for name, data in part.result["systems"].items():
            metrics = ({HELDOUT_LOSS: float(np.mean(losses[part.names[name]]))} if losses else {}) | data["metrics"]
            systems[part.names[name]] = {key: value for key, value in data.items() if key != "ab_vs_base"} | {"metrics": metrics}
    if BASE in systems:
        for name, data in systems.items():
            if name != BASE:
                data["ab_vs_base"] = ab_vs_base(name, losses or {}, videos, per_video, definitions)
    return {
        "format": FORMAT,
        "model": first["model"],
        "heldout": first["heldout"],
        "seeds": first["seeds"],
        "generation": first["generation"],
        "engine": {"device": first["engine"]["device"], "pipelines": len(parts),
                   "adapter_swaps": sum(part.result["engine"]["adapter_swaps"] for part in parts)},
        "metric_definitions": definitions,
        "systems": systems,
        "prompts": [{key: value for key, value in prompt.items() if key != HELDOUT_LOSS} for prompt in first["prompts"]],
        "videos": [{"system": v.system, "prompt": v.prompt, "seed": v.seed, "path": str(v.path), **v.scores} for v in videos],
        "timing_s": _sum([part.result["timing_s"] for part in parts]),
        "seconds_per_video": _mean([part.result["seconds_per_video"] for part in parts]),
    }


def _sum(tables: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for table in tables:
        for key, value in table.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _mean(tables: list[dict[str, float]]) -> dict[str, float]:
    """Each part generated as many videos (one system x the same prompts and seeds): a plain mean is per video."""
    keys = dict.fromkeys(key for table in tables for key in table)
    return {key: float(np.mean([table[key] for table in tables if key in table])) for key in keys}
