"""`slapgen eval --ray ADDRESS`: the videos (system x prompt x seed) generated as Ray tasks on any node, one
shard per system (the slot swaps once per system, as in one process); every metric is then computed by the
driver, from the mp4s, exactly as for videos made in this process.

- Each shard is a Ray task asking for `--gpus-per-run` GPUs, in a worker process of its own (`max_calls=1`: its
  pipeline and GPU memory leave with it). It loads its own `VideoGenerator` (the driver's engine options) and
  runs `run.generate` on its system: the same seeds, settings and prompts, so the same videos as one process
  makes (bit-identical on CPU), written atomically into OUT/videos/SYSTEM/pNNN-sSEED.mp4 on storage every node
  sees. Its output goes to OUT/videos/SYSTEM/shard.log, one line per attempt naming node and pid.
- A node lost mid-eval: Ray retries the task (`MAX_RETRIES` system failures; an error of the generation itself is
  not retried), and the retry keeps the mp4s the lost attempt finished (an mp4 exists only once whole). The
  driver deletes the videos an earlier eval left at those paths before any shard starts, so every video kept
  is this eval's.
- Progress: the driver counts the finished mp4s of every shard each tick; one bar, with its ETA, for all.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import replace
from pathlib import Path

from trainer import ray_cluster
from trainer.errors import EvalError

PLAN_FILE = "ray-shards.json"  # OUT/videos/ray-shards.json: this eval's shards; every node must read the same file
SHARD_LOG = "shard.log"
ATTEMPT_MARK = "eval shard attempt on Ray node"
MAX_RETRIES = 3  # system failures (a worker or node died) per shard; each retry keeps the shard's finished mp4s


def not_shared_sentence(out: Path, nodes: list[str]) -> str:
    return (f"the eval folder {out} is not the same folder on Ray node(s) {', '.join(nodes)} (no videos/{PLAN_FILE} "
            f"there, or another one): put --out on storage every node mounts at the same path (NFS or a shared disk)")


def generate_shard(options, resolved, system, layout, prompts: list[str], conditions: list[Path], params, rank: int,
                   targets: tuple[str, ...], device: str) -> int:
    """One system's videos, inside a Ray task: its own pipeline on `device`, `run.generate` keeping the mp4s
    already there (a retried attempt's). Returns how many videos the shard has."""
    import ray

    from slapgen.engine.generator import VideoGenerator
    from slapgen.engine.params import EngineOptions
    from slapgen.models.loading import resolve_model
    from trainer.evaluate.options import MODEL_SETTING
    from trainer.evaluate.run import Timer, generate

    out = Path(options.out)
    if not (out / "videos" / PLAN_FILE).is_file():  # a node that joined after the start-up check
        raise EvalError(not_shared_sentence(out, [ray.util.get_node_ip_address()]))
    ray_cluster.log_attempt(out / "videos" / system.name / SHARD_LOG, ATTEMPT_MARK)
    if not resolved.folder.is_dir():  # the driver's copy of the model is not on this node: this node's own
        resolved = resolve_model(options.model, options.model_cache_dir, setting=MODEL_SETTING)
    generator = VideoGenerator.load(resolved, EngineOptions(device=device, adapters_dir=out / "adapters",
                                                            max_lora_rank=rank, lora_target_modules=targets))
    videos = generate(generator, [system], {system.name: layout}, prompts, conditions, params, options, out, Timer(),
                      keep_existing=True)
    sys.stdout.flush()
    return len(videos)


def generate_on_ray(options, resolved, systems: list, layouts: dict, prompts: list[str], conditions: list[Path], params,
                    rank: int, targets: tuple[str, ...], interval_s: float = 1.0) -> list:
    """Every system's videos as Ray tasks (all submitted at once; Ray queues what the cluster cannot place yet) on
    the cluster `ray_cluster.connect` joined; returns the `run.Video`s in the order one process makes them.
    EvalError naming each failed shard and its log."""
    from trainer.evaluate.run import Video, bar, video_path

    ray = ray_cluster.import_ray()
    options_out = options.out
    out = Path(options.out).resolve()
    options = replace(options, out=out)  # a worker's working folder is not the driver's
    conditions = [Path(path).resolve() for path in conditions]
    planned = [(system, prompt, seed) for system in systems for prompt in range(len(prompts)) for seed in options.seeds]
    paths = [video_path(out, system.name, prompt, seed) for system, prompt, seed in planned]
    # The driver's names for them, as one process gives (eval.json's paths are relative to --out as given).
    videos = [Video(system.name, prompt, seed, video_path(Path(options_out), system.name, prompt, seed))
              for system, prompt, seed in planned]
    for path in paths:  # an earlier eval's video at this eval's path: never kept as this one's
        path.unlink(missing_ok=True)
    plan = out / "videos" / PLAN_FILE
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps({"eval": uuid.uuid4().hex, "shards": [system.name for system in systems]}))
    ray_cluster.check_shared_folder(plan, lambda nodes: not_shared_sentence(out, nodes))

    device = "cuda" if options.gpus_per_run > 0 else "cpu"
    shard = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, max_calls=1)(generate_shard)
    refs = {shard.options(num_gpus=options.gpus_per_run, name=f"slapgen-eval {system.name}").remote(
        options, resolved, system, layouts[system.name], prompts, conditions, params, rank, targets, device): system.name
        for system in systems}
    progress = bar(len(paths), f"generate ({len(systems)} shards on Ray)", "video")
    try:
        outcome = ray_cluster.wait_for_tasks(
            refs, MAX_RETRIES, lambda _: progress.update(sum(path.is_file() for path in paths) - progress.n), interval_s)
    finally:
        progress.close()
    failed = {name: why for name, why in outcome.items() if why is not None}
    if failed:
        raise EvalError(f"{len(failed)} of {len(systems)} generation shards failed: "
                        + "; ".join(f"{name} ({why}; see {out / 'videos' / name / SHARD_LOG})" for name, why in failed.items()))
    return videos
