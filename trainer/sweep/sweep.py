"""`slapgen sweep`, top to bottom: check everything, claim the folder, encode once, run, report.

1. Parse the grid, metrics and generation settings; read both datasets; build and validate every
   run's config (`grid.plan_runs`) and the generation settings against the model. Nothing is written
   before all of it passes.
2. The folder: a new one gets `sweep.json`; one that holds this same sweep continues; any other is
   refused with one sentence (`folder.check_folder`), under a lock no second sweep can take.
3. The latent cache, once: every training and held-out clip (and the validation prompts) is encoded
   into OUT/latent-cache, which every run's `latent_cache` names, so no run encodes anything (the
   held-out clips twice with generation metrics: at the training size for the loss, at the videos'
   size for `slapgen eval`).
4. The runs (`execute.execute_run`, each from wherever it stopped, evaluation included; with
   --checkpoints every checkpoint of it): one at a time in this process on a CPU or one GPU; with
   several GPUs, one child process per GPU (`pool.run_pool`); with `--ray`, one Ray task per run on
   any node of a cluster (`ray_runs`). With --generate-top K, then the K best checkpoints of the
   sweep get their generation metrics (`candidates.generate_top`). With generation metrics, then the
   base model (`execute.execute_base`).
5. The report (`report.write_report`, the winner by --pick-by; with generation metrics also
   `report.write_eval_report`).
"""

from __future__ import annotations

import gc
import sys
from contextlib import ExitStack
from pathlib import Path

from trainer.datasets import read_dataset, read_training_clips
from trainer.evaluate.names import metrics_line
from trainer.errors import SweepError
from trainer.ray_cluster import DEFAULT_NODE_WAIT_S, NodeWait, TaskDemand
from trainer.run_folder import last_logged_step
from trainer.evaluate.checkpoints import check_generate_top
from trainer.evaluate.picking import check_measured, check_pick_by
from trainer.sweep.candidates import CandidateRequest, generate_top
from trainer.sweep.evaluate import (EvalRequest, check_metrics, generation_data,
                                    plan_evaluation)
from trainer.sweep.execute import (BASE_DIR, RESULT_FILE, RunState, evaluation_inputs, execute_base, execute_run,
                                   read_result, run_state, steps_done)
from trainer.sweep.folder import (CACHE_DIR, RUNS_DIR, SweepDefinition, check_clips, check_folder, run_dir,
                                  sweep_lock, write_definition)
from trainer.sweep.grid import alpha_follows_rank, parse_axis, plan_runs
from trainer.sweep.pool import Job, run_pool
from trainer.sweep.progress import SweepProgress
from trainer.sweep.report import execution_words, write_eval_report, write_report


def plan_sweep(config: str, sets: list[str], grid: list[str], data: Path, heldout: Path, out: Path,
               metrics: list[str], request: EvalRequest = EvalRequest(),
               candidates: CandidateRequest = CandidateRequest(), resolve_models: bool = True) -> SweepDefinition:
    """The sweep the command asks for, every part validated; reads, never writes (but for the model: see
    `check_generation`, and `plan_runs`' `resolve_models`, off for the CLI's check of what was typed)."""
    axes = [parse_axis(text) for text in grid]
    measured = check_metrics(metrics)
    check_generate_top(candidates.generate_top, candidates.checkpoints, measured)
    read_dataset(Path(data))  # a missing or malformed dataset is one sentence now, not after an hour of runs
    read_dataset(Path(heldout))
    runs = plan_runs(config, sets, axes, latent_cache=Path(out).resolve() / CACHE_DIR, resolve_models=resolve_models)
    evaluation = plan_evaluation(measured, runs, request)
    pick_by = check_measured(check_pick_by(candidates.pick_by), measured, evaluation.clip_model if evaluation else None)
    return SweepDefinition(
        config=config, sets=tuple(sets), axes=tuple(axes), data=str(Path(data).resolve()),
        heldout=str(Path(heldout).resolve()), metrics=measured, alpha_follows_rank=alpha_follows_rank(axes, sets),
        runs=tuple(runs), evaluation=evaluation, checkpoints=candidates.checkpoints,
        generate_top=candidates.generate_top, pick_by=pick_by,
    )


def check_generation(definition: SweepDefinition) -> None:
    """Generation settings that do not fit the model (size, frames, FVD's minimum length): one sentence now,
    not after the first run. Resolves the model (as the cache step would next), so it runs after the folder check."""
    if definition.evaluation is not None:
        generation_data(definition.runs[0].config, definition.metrics, definition.evaluation)


def encode_once(definition: SweepDefinition, device: str) -> dict[str, dict[str, str]]:
    """Encode every clip any run trains or is judged on, and the validation prompts, into the shared cache. Returns
    the clips of --data and --heldout by name and content (their file, caption and condition; `check_clips`)."""
    from slapgen.models.loading import TRAINER_SETTING, resolve_model
    from trainer.latent_cache import LatentCache

    clips: dict[str, dict[str, str]] = {}
    done = set()
    for run in definition.runs:
        config = run.config
        key = (config.model, str(config.model_cache_dir), str(config.latent_cache), config.data.model_dump_json(),
               config.ticft.model_dump_json() if config.ticft else "")
        if key in done:
            continue
        done.add(key)
        resolved = resolve_model(config.model, config.model_cache_dir, setting=TRAINER_SETTING)
        # A TIC-FT run trains and is judged on its layout's condition + target clips: those are what to encode.
        cache = LatentCache(config.latent_cache, resolved, config.data, device=device, ticft=config.ticft)
        trigger = config.data.trigger_word
        training = read_training_clips(Path(definition.data), config.data.max_clips, trigger)
        heldout = read_training_clips(Path(definition.heldout), None, trigger)
        reports = {"data": cache.precompute(training), "heldout": cache.precompute(heldout)}
        print(f"latent cache, training clips: {reports['data'].summary()}")
        print(f"latent cache, held-out clips: {reports['heldout'].summary()}")
        if not clips:  # one group's keys: a clip's content or caption changes every group's
            clips = {role: {entry.clip.name: entry.content for entry in report.entries} for role, report in reports.items()}
        if definition.evaluation is not None:  # what `slapgen eval` reads in every run, encoded once here
            generated = LatentCache(config.latent_cache, resolved,
                                    generation_data(config, definition.metrics, definition.evaluation), device=device)
            print(f"latent cache, held-out clips at the evaluation's size: {generated.precompute(heldout).summary()}")
            generated.release_encoders()
        cache.prompt_embeddings([*config.validation_prompts, ""])
        cache.release_encoders()
    return clips


def gpu_slots() -> list[str]:
    """One `CUDA_VISIBLE_DEVICES` value per GPU when there are several; [] for one GPU or none."""
    import os

    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return []
    visible = [item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    return (visible or [str(index) for index in range(count)])[:count]


def _in_process(definition: SweepDefinition, out: Path, pending: list, progress: SweepProgress, device: str) -> None:
    import torch

    for run in pending:
        progress.show([run.name])
        progress.say(f"{run.name}: {run_state(run_dir(out, run)).value}")

        result = execute_run(definition, run, out, device, on_step=lambda step, name=run.name: progress.step(name, step))
        progress.say(f"{run.name}: {metrics_line(result['metrics'])}")
        gc.collect()  # the run's model and optimizer, before the next run allocates its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _watch(definition: SweepDefinition, out: Path, progress: SweepProgress):
    """The bar's tick when runs train outside this process (`pool`'s children, Ray's tasks): their steps, read from
    the metrics.jsonl of each run seen running (one that ended since the last tick: its last steps too)."""
    seen: list[str] = []

    def on_tick(running: list[str]) -> None:
        seen.extend(name for name in running if name not in seen)
        progress.show(running)
        for name in seen:
            progress.step(name, last_logged_step(run_dir(out, definition.run(name))))

    return on_tick


def run_log_pattern(out: Path) -> str:
    """Where each run's log is, as a path from where the sweep runs (as every path it prints: one to copy)."""
    return str(Path(out) / RUNS_DIR / "NAME" / "sweep.log")


def _in_pool(definition: SweepDefinition, out: Path, pending: list, progress: SweepProgress, slots: list[str]) -> None:
    jobs = [Job(run.name, [sys.executable, "-m", "trainer.sweep.execute", str(out), run.name], run_dir(out, run) / "sweep.log")
            for run in pending]
    progress.say(f"{len(pending)} runs on GPUs {','.join(slots)}, one run per GPU; each run logs to "
                 f"{run_log_pattern(out)}")
    codes = run_pool(jobs, slots, _watch(definition, out, progress))
    _raise_failed([f"{name} (exit {code}, see {run_dir(out, definition.run(name)) / 'sweep.log'})"
                   for name, code in codes.items() if code != 0], len(pending))


def _on_ray(definition: SweepDefinition, out: Path, pending: list, progress: SweepProgress, nodes: NodeWait) -> None:
    from trainer.sweep.ray_runs import run_cells

    from trainer.ray_cluster import cluster_line

    progress.say(f"{len(pending)} runs as Ray tasks of {nodes.demand.gpus:g} GPU each on the {cluster_line()}; "
                 f"each run logs to {run_log_pattern(out)}")
    outcome = run_cells(out, [run.name for run in pending], nodes, _watch(definition, out, progress))
    for name, failure in outcome.items():
        if failure is None:
            result = read_result(run_dir(out, definition.run(name)))
            progress.say(f"{name}: {metrics_line(result['metrics'])}")
    _raise_failed([f"{name} ({failure}; see {run_dir(out, definition.run(name)) / 'sweep.log'})"
                   for name, failure in outcome.items() if failure is not None], len(pending))


def _raise_failed(failed: list[str], pending: int) -> None:
    if failed:
        raise SweepError(f"{len(failed)} of {pending} runs failed: {'; '.join(failed)}; rerun the same command to retry them")


def run_sweep(config: str, sets: list[str], grid: list[str], data: Path, heldout: Path, out: Path,
              metrics: list[str], progress: bool = True, request: EvalRequest = EvalRequest(),
              candidates: CandidateRequest = CandidateRequest(), ray: str | None = None,
              gpus_per_run: float = 1, node_wait_s: float = DEFAULT_NODE_WAIT_S) -> Path:
    """Run (or continue) the sweep; returns the folder, which then holds every report file. `ray`: the Ray
    cluster (`ray_cluster.connect`) whose nodes run the runs, each asking for `gpus_per_run` GPUs; the sweep
    stops once no live node could run them for `node_wait_s` seconds."""
    from trainer.cli import default_device

    out = Path(out)
    definition = plan_sweep(config, sets, grid, data, heldout, out, metrics, request, candidates)
    check_folder(out, definition)
    check_generation(definition)
    on_ray = ray  # the cluster the runs left run on (None: this machine); `ray` stays in the report's command
    if ray is not None and all(run_state(run_dir(out, run)) is RunState.FINISHED for run in definition.runs):
        # Nothing left for a cluster (runs only ever finish, so none will be under the lock either): --ray local
        # started one for nothing (9 s here), and --ray auto needed one running to write the report again.
        print("sweep: every run finished before: no Ray cluster is needed", flush=True)
        on_ray = None
    with ExitStack() as stack:
        if on_ray is not None:  # a cluster that does not answer: one sentence before anything is written
            from trainer.ray_cluster import check_placeable, connect
            from trainer.sweep.ray_runs import check_shared_folder
            stack.enter_context(connect(on_ray))
            check_placeable(TaskDemand(gpus_per_run), on_ray)
        stack.enter_context(sweep_lock(out))
        check_folder(out, definition)  # again, now that no other sweep can write it
        write_definition(out, definition)  # new, or another --pick-by (the only difference check_folder lets by)
        if on_ray is not None:
            check_shared_folder(out, data, heldout)
        device = default_device()
        check_clips(out, encode_once(definition, device))
        runs = list(definition.runs)
        pending = [run for run in runs if run_state(run_dir(out, run)) is not RunState.FINISHED]
        print(f"sweep: {len(runs)} runs, {len(runs) - len(pending)} already finished")
        done = {run.name: steps_done(run_dir(out, run), run.config.train.max_train_steps) for run in runs}
        bar = SweepProgress(runs, done, enabled=progress)
        try:
            if on_ray is not None:
                _on_ray(definition, out, pending, bar, NodeWait(TaskDemand(gpus_per_run), on_ray, "a run", node_wait_s,
                                                                bar.say))
            elif len(slots := gpu_slots()) > 1 and len(pending) > 1:
                _in_pool(definition, out, pending, bar, slots)
            else:
                _in_process(definition, out, pending, bar, device)
        finally:
            bar.close()
        results = {run.name: read_result(run_dir(out, run)) for run in runs}
        if definition.generate_top is not None:  # needs every run's held-out losses, so after the last run
            generate_top(definition, out, evaluation_inputs(definition, device))
        base = None
        if definition.evaluation is not None:
            base_done = (out / BASE_DIR / RESULT_FILE).is_file()
            print("base model: " + ("evaluated before" if base_done else "evaluating (once, for the A/B of every run)"))
            base = execute_base(definition, out, device)
            print(f"base model: {metrics_line(base['metrics'])}")
        best = write_report(out, definition, results, base, execution_words(ray, gpus_per_run, node_wait_s))
        if base is not None:
            write_eval_report(out, definition, results, base)
    print(f"best: {best.say(out)}; report: {out / 'README.md'}, config: {out / 'best.yaml'}")
    return out

