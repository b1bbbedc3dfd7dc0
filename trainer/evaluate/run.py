"""`slapgen eval`, top to bottom: held-out clips -> held-out loss per system -> videos per system,
prompt and seed (one pipeline, the slot swapped between systems) -> metrics per video and per
system -> A/B against `base` -> the result dict `report` writes out.

Every system sees the same prompts (the held-out captions), seeds and settings. Videos are scored
from the mp4 files written, the frames a person watches in the report.

With `--checkpoints` each run's saved steps are systems `NAME@STEP` (`checkpoints`), all through the
same slot; held-out loss on all of them, videos on all or (`--generate-top K`) on the K with the lowest
held-out loss over every run given, then `curves.summary` per run: the pick under `--pick-by`, the best per metric, and
overfitting in words (eval.json's `checkpoints`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from slapgen.errors import SlapgenError
from slapgen.evaluation import stats
from slapgen.evaluation.frechet import frechet_with_interval, reliable_sample_count
from slapgen.models.family import family_of
from slapgen.models.loading import ResolvedModel, resolve_model
from slapgen.models.ticft import TicftLayout, objective_name
from slapgen.timing import PhaseTimes
from slapgen.video import read_mp4, write_mp4_atomic
from trainer.config import DataConfig
from trainer.errors import EvalError
from trainer.evaluate.checkpoints import Candidate, run_candidates, system_name, top_by_heldout_loss
from trainer.evaluate.curves import summary
from trainer.evaluate.names import FLICKER, FVD, HELDOUT_LOSS, SUBJECT, TICFT_BASE_LOSSES
from trainer.evaluate.options import BASE, MODEL_SETTING, EvalOptions
from trainer.evaluate.recipes import (forget, loss_recipe, made_earlier, measured_earlier, recipe_base, record,
                                      record_losses, video_recipe, why_not_kept)
from trainer.evaluate.systems import (System, check_base_models, resolve_systems, slot_shape, stage_adapters,
                                      trigger_word_of)
from trainer.frames import load_clip
from trainer.heldout import DEFAULT_FRACTIONS, heldout_entries, heldout_losses
from trainer.ray_cluster import TaskDemand

FORMAT = 1
LOSSES_DIR = "heldout_losses"  # OUT/heldout_losses/SYSTEM.json: each system's per-clip losses and their recipe


@dataclass
class Video:
    system: str
    prompt: int
    seed: int
    path: Path
    scores: dict[str, float] = field(default_factory=dict)


def bar(total: int, description: str, unit: str):
    from trainer.progress import progress_bar

    return progress_bar(total=total, desc=description, unit=unit, dynamic_ncols=True)


def run_eval(options: EvalOptions) -> dict:
    """The evaluation `options` ask for; with `--ray`, connected to that cluster first (one sentence when it
    does not answer, or when it is `local` and has no node with what a worker asks for, its GPUs or, a CPU worker,
    its memory: before anything else is read or written). An --out folder this run made is removed again when
    it stops on an error before writing anything into it (a held-out caption that is not UTF-8, say)."""
    out = Path(options.out)
    made_here = not out.exists()
    try:
        return _run_eval(options)
    except SlapgenError:
        if made_here and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run_eval(options: EvalOptions) -> dict:
    if options.ray is None:
        return evaluate(options)
    from trainer.evaluate.ray_shards import worker_demand
    from trainer.ray_cluster import check_placeable, connect

    with connect(options.ray):
        # One demand, checked here and asked for by every worker. A CPU worker's is its model's weights' memory, so
        # the model is resolved first; a GPU worker's needs no model (none downloaded before a missing GPU is said).
        resolved = resolve_model(options.model, options.model_cache_dir, setting=MODEL_SETTING) \
            if options.gpus_per_run == 0 else None
        demand = worker_demand(options.gpus_per_run, resolved.folder if resolved is not None else None)
        check_placeable(demand, options.ray, task="a worker")
        return evaluate(options, resolved, demand)


def evaluate(options: EvalOptions, resolved: ResolvedModel | None = None, demand: TaskDemand | None = None) -> dict:
    """`resolved`: the model `run_eval` resolved (None: resolved here); `demand`: what each Ray worker asks for
    (`ray_shards.worker_demand`, with --ray)."""
    from slapgen.engine.generator import VideoGenerator

    timer = PhaseTimes()
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {options.device} needs a CUDA GPU and none is usable here; use --device cpu")
    # --checkpoints: each run folder's saved steps (read first: a bad folder is one sentence before the model loads).
    plans = {adapter.name: run_candidates(adapter.name, adapter.path) for adapter in options.adapters} \
        if options.checkpoints else {}
    if resolved is None:
        resolved = resolve_model(options.model, options.model_cache_dir, setting=MODEL_SETTING)
    params = options.params(resolved.spec)
    systems = resolve_systems(options.adapters, include_base=options.include_base, checkpoints=plans)
    check_base_models(systems, resolved.spec.name)
    options = replace(options, trigger_word=trigger_word_of(systems, options.trigger_word))
    options.check_ticft_frames({system.name: system.ticft_layout for system in systems})
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Held-out clips into the latent cache (their captions are the prompts); for the held-out loss of a
    # TIC-FT adapter, also as its layout's condition + target. All before the pipeline loads, so the VAE
    # and text encoder are never in memory beside it.
    data = heldout_data(params, options.max_clips, options.trigger_word)
    started = time.perf_counter()
    cache = options.cache or out / "cache"
    entries = heldout_entries(options.heldout, resolved, data, cache, device=options.device)
    layouts = {system.name: system.ticft_layout for system in systems}
    layout_entries = {layout: ticft_entries(options, resolved, data, layout, entries)
                      for layout in dict.fromkeys(layouts.values()) if layout is not None} \
        if "loss" in options.metrics else {}
    timer.add("latent_cache", started)
    prompts = [entry.clip.caption or "" for entry in entries]

    # 2. One pipeline; every system through its hot-swap slot.
    started = time.perf_counter()
    stage_adapters(systems, out / "adapters")
    rank, targets = slot_shape(systems)
    generator = VideoGenerator.load(resolved, eval_engine_options(options.device, out, rank, targets))
    timer.add("load_pipeline", started)

    # What every number and video comes from (`recipes`): a rerun into the same --out keeps an earlier run's
    # held-out losses and videos made from the recipes this eval has for them.
    digests: dict[Path, str] = {}
    loss_base = recipe_base(resolved, eval_engine_options(options.device, out, rank, targets))
    losses, losses_kept = held_out_losses(generator, resolved, systems, layouts, {None: entries, **layout_entries},
                                          params.adapter_scale, options, timer, loss_base, digests) \
        if "loss" in options.metrics else ({}, 0)
    conditions = [entry.clip.video for entry in entries]
    generating = systems_to_generate(systems, plans, losses, options.generate_top)
    planned = planned_videos(generating, len(prompts), options.seeds) if options.generates else []
    video_base = recipe_base(resolved, eval_engine_options(generation_device(options), out, rank, targets),
                             here=options.ray is None)
    video_recipes = recipes_of(planned, video_base, layouts, prompts, conditions, params, digests)
    kept = sort_out_earlier_videos(out, planned, video_recipes)
    if kept < len(planned):  # an earlier report names videos removed or not made yet: it is written anew at the end
        forget_reports(out)
    videos = generate(generator, planned, video_recipes, layouts, prompts, conditions, params, options, out, timer) \
        if options.generates and options.ray is None else []
    engine = {"device": options.device, "adapter_swaps": generator.slot.swaps,
              "slot_rank": generator.slot.max_rank, "slot_target_modules": list(generator.slot.target_modules),
              "videos_kept": kept, "losses_kept": losses_kept}
    del generator
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if options.generates and options.ray is not None:  # after the driver's pipeline is gone: workers may share its GPU
        from trainer.evaluate.ray_shards import generate_on_ray

        started = time.perf_counter()
        videos, workers = generate_on_ray(options, resolved, demand, planned, video_recipes, layouts, prompts,
                                          conditions, params, rank, targets)
        timer.add("generate", started)
        engine["ray"] = {"address": options.ray, "gpus_per_worker": options.gpus_per_run, "workers": workers}

    definitions: dict[str, dict] = {}
    if losses:
        definitions[HELDOUT_LOSS] = heldout_loss_definition(resolved, layouts, options.loss_seed, entries, data)
    fvd = {}
    if videos:
        score_videos(videos, prompts, options, definitions, timer)
        if "fvd" in options.metrics:
            fvd = fvd_per_system(videos, entries, data, options, definitions, timer)

    result = assemble(options, resolved.spec.name, params, systems, layouts, entries, prompts, losses, videos, fvd,
                      definitions, engine, timer)
    if plans:
        result["checkpoints"] = checkpoint_section(options, plans, result, {video.system for video in videos})
    return result


def heldout_loss_definition(resolved: ResolvedModel, layouts: dict[str, TicftLayout | None], seed: int,
                            entries: list, data: DataConfig) -> dict:
    """eval.json's definition of the held-out loss: what a campaign compares before setting two eval folders'
    losses side by side (`trainer.campaign.comparable_metrics`: equal definitions). The model family's objective
    and each system's task (losses of two objectives are different numbers), the noise levels, seed and clip
    count, the clips' frames and size (`data`: the generated videos', so FVD's 16 frames or more made the same
    adapter's loss 1.062 where `--metrics loss` gave 1.077 on 9, and a campaign compared the two), and the
    latent space the clips were encoded into (the same objective in another VAE's latents is another number too)."""
    family = family_of(resolved.spec)
    levels = family.noise_levels(DEFAULT_FRACTIONS, family.load_training_scheduler(resolved.folder)).tolist()
    definition = {
        "higher_is_better": False,
        "what": f"the training objective ({family.objective}) on the held-out clips' "
                "cached latents at fixed timesteps with noise seeded per clip; no generation",
        "timesteps": levels, "seed": seed, "clips": len(entries),
        "frames": data.num_frames, "size": [data.height, data.width],
        "objective": family.objective,
        "objectives": {name: objective_name(layout) for name, layout in layouts.items()},  # eval: first-frame conditions
        "latents": family.latent_space(resolved.folder)}
    if any(layouts.values()):
        definition["ticft"] = (
            "a TIC-FT adapter's held-out loss is its training objective: each clip cached as condition (its first "
            "frame) + target in one VAE pass, condition frames clean, buffer k noised to min(t, T_k), the loss on "
            f"the target frames only; its A/B is against the base model on that same objective ({BASE}@LAYOUT), "
            "never against a text-to-video loss")
    return definition


def systems_to_generate(systems: list[System], plans: dict[str, list[Candidate]], losses: dict[str, list[float]],
                        top: int | None) -> list[System]:
    """Every system, or with `--generate-top K` base, the adapters given as files and the K checkpoints
    with the lowest held-out loss over every run given (`checkpoints.top_by_heldout_loss`, the sweep's
    rule too)."""
    if top is None:
        return systems
    mean_loss = {name: float(np.mean(values)) for name, values in losses.items()}
    checkpointed = [system_name(adapter, candidate.step) for adapter, candidates in plans.items()
                    for candidate in candidates]
    kept = set(top_by_heldout_loss({name: mean_loss.get(name) for name in checkpointed}, top))
    return [system for system in systems if system.name not in checkpointed or system.name in kept]


def checkpoint_section(options: EvalOptions, plans: dict[str, list[Candidate]], result: dict, generated: set[str]) -> dict:
    """eval.json's `checkpoints`: each run's curves, best pick and overfitting verdict (`curves.summary`)."""
    scores = {name: data["metrics"] for name, data in result["systems"].items()}
    metrics = list(result["metric_definitions"])
    return {"pick_by": options.pick_metric, "generate_top": options.generate_top,
            "runs": {adapter.name: summary(adapter.name, adapter.path, plans[adapter.name], scores, metrics,
                                           options.pick_metric, sorted(generated))
                     for adapter in options.adapters}}


def heldout_data(params, max_clips: int | None, trigger_word: str | None = None) -> DataConfig:
    """How the held-out clips are read for evaluation: at the generated videos' size, length and fps, so
    the held-out loss is of the clips at that size and FVD compares like with like."""
    return DataConfig(height=params.height, width=params.width, num_frames=params.num_frames, fps=params.fps,
                      max_clips=max_clips, trigger_word=trigger_word)


def loss_reference(layout: TicftLayout | None) -> str:
    """Whose held-out losses a system's are compared with: the base model's on the same objective."""
    return BASE if layout is None else f"{BASE}@{layout}"


def held_out_losses(generator, resolved, systems: list[System], layouts: dict[str, TicftLayout | None],
                    layout_entries: dict, scale: float, options: EvalOptions, timer: PhaseTimes, base_recipe: dict,
                    digests: dict[Path, str]) -> tuple[dict[str, list[float]], int]:
    """Per-clip held-out losses (in the plain entries' order) of every system on its own objective: the plain
    one, or a TIC-FT adapter's (`layout_entries[layout]`, the clips cached with its layout). With `base` among
    the systems, the base model is also measured on every TIC-FT layout present, as `base@LAYOUT`, the
    reference of those adapters' A/B. Each system's losses are written to OUT/heldout_losses/NAME.json with their
    recipe (`recipes.loss_recipe`, from `base_recipe`) the moment they are measured; losses an earlier run wrote
    there from the same recipe are kept, not measured again. Returns the losses and how many systems' were kept."""
    family = family_of(resolved.spec)
    scheduler = family.load_training_scheduler(resolved.folder)
    levels = family.noise_levels(DEFAULT_FRACTIONS, scheduler).tolist()
    jobs = [(system.name, system.adapter, system.weights, layouts[system.name]) for system in systems]
    if any(system.name == BASE for system in systems):
        jobs += [(loss_reference(layout), None, None, layout) for layout in layout_entries if layout is not None]
    clips = len(layout_entries[None])
    store = Path(options.out) / LOSSES_DIR
    recipes = {name: loss_recipe(base_recipe, weights, digests, scale, layout, options.loss_seed, levels,
                                 [entry.key for entry in layout_entries[layout]]) for name, _, weights, layout in jobs}
    kept = {name: values for name in recipes if (values := measured_earlier(store / f"{name}.json", recipes[name]))}
    if kept:
        print(f"eval: keeping the held-out losses of {len(kept)} of {len(jobs)} systems an earlier run measured in "
              f"{store} from the same model, adapter and clips", flush=True)
    progress = bar(len(jobs) * clips * len(levels), "held-out loss", "forward")
    progress.update(len(kept) * clips * len(levels))
    losses = {}
    started = time.perf_counter()
    for name, adapter, _, layout in jobs:
        if name in kept:
            losses[name] = kept[name]
            continue
        progress.set_postfix(system=name)
        with generator.activated(adapter, scale) as transformer:
            losses[name] = heldout_losses(transformer, scheduler, layout_entries[layout], seed=options.loss_seed,
                                          timesteps=levels, dtype=resolved.spec.torch_dtype,
                                          on_forward=lambda: progress.update(1), layout=layout, family=family)
        record_losses(store / f"{name}.json", recipes[name], losses[name])
    progress.close()
    timer.add(HELDOUT_LOSS, started)
    return losses, len(kept)


def ticft_entries(options: EvalOptions, resolved, data: DataConfig, layout: TicftLayout, entries) -> list:
    """The held-out clips cached as `layout`'s condition (each clip's first frame, as eval's TIC-FT videos
    are conditioned) + target, in the order of the plain `entries`, so the per-clip A/B pairs the same
    clips; EvalError when a clip the plain cache reads is too short for the layout's target."""
    from trainer.config import TicftConfig

    layout_data = data.model_copy(update={"num_frames": layout.pixel_frames})
    cached = heldout_entries(options.heldout, resolved, layout_data, options.cache or Path(options.out) / "cache",
                             device=options.device, ticft=TicftConfig(layout=str(layout)), say_left_out=False)
    by_clip = {(entry.clip.video, entry.clip.caption): entry for entry in cached}
    missing = [entry.clip.name for entry in entries if (entry.clip.video, entry.clip.caption) not in by_clip]
    if missing:
        raise EvalError(f"held-out clip {missing[0]} is too short for TIC-FT layout {layout} (its target needs "
                        f"{layout.target_pixel_frames} frames at {data.fps:g} fps) though the plain evaluation reads "
                        "it; drop it from the held-out set or leave loss out of --metrics")
    return [by_clip[(entry.clip.video, entry.clip.caption)] for entry in entries]


def video_path(out: Path, system: str, prompt: int, seed: int) -> Path:
    return out / "videos" / system / f"p{prompt:03d}-s{seed}.mp4"


def generation_device(options: EvalOptions) -> str:
    """The device the videos are made on: --device, or with --ray each worker's (a GPU with --gpus-per-run)."""
    if options.ray is None:
        return options.device
    return "cuda" if options.gpus_per_run > 0 else "cpu"


def eval_engine_options(device: str, out: Path, rank: int, targets: tuple[str, ...] | None):
    """The engine every pipeline of an eval is built with (this process's and each Ray worker's): the adapters
    linked into OUT/adapters, one slot for all of them, the rest the engine's defaults."""
    from slapgen.engine.params import EngineOptions

    return EngineOptions(device=device, adapters_dir=Path(out) / "adapters", max_lora_rank=rank,
                         lora_target_modules=targets)


def video_params(system: System, index: int, seed: int, layouts: dict[str, TicftLayout | None], prompts: list[str],
                 conditions: list[Path], params, condition_image=None):
    """The generation of one planned video, as the engine gets it: the eval's settings with the prompt, seed and the
    system's adapter; a TIC-FT adapter animates the first frame of the held-out clip the prompt belongs to (as
    training conditioned each clip on its own first frame), over its layout's length, and yields the layout's
    target frames. `condition_image`: that frame when already decoded."""
    from slapgen.images import first_frame

    layout = layouts[system.name]  # from the LoRA header; the engine checks it against the model on use
    if layout is not None:
        image = condition_image if condition_image is not None else first_frame(conditions[index])
        params = params.replace(num_frames=layout.pixel_frames, condition_image=image)
    return params.replace(prompt=prompts[index], seed=seed, adapter=system.adapter)


def recipes_of(planned: list[tuple[System, int, int]], base: dict, layouts: dict[str, TicftLayout | None],
               prompts: list[str], conditions: list[Path], params, digests: dict[Path, str]) -> list[dict]:
    """Each planned video's recipe (`recipes.video_recipe`), in `planned`'s order; `digests`: the adapters' files'
    digests read so far."""
    from slapgen.images import first_frame

    frames: dict[int, object] = {}  # a condition clip's first frame, decoded once
    made = []
    for system, index, seed in planned:
        if layouts[system.name] is not None and index not in frames:
            frames[index] = first_frame(conditions[index])
        video = video_params(system, index, seed, layouts, prompts, conditions, params, frames.get(index))
        made.append(video_recipe(base, video, system.weights, digests))
    return made


def sort_out_earlier_videos(out: Path, planned: list[tuple[System, int, int]], video_recipes: list[dict]) -> int:
    """Before any video is made: keep each video an earlier run made into `out` from the recipe this eval has for it,
    remove the others at this eval's paths (other settings, another checkpoint, a retrained LoRA of the same name),
    and say how many are kept. Returns that count."""
    kept, remade = 0, []
    for (system, index, seed), recipe in zip(planned, video_recipes, strict=True):
        path = video_path(out, system.name, index, seed)
        if made_earlier(path, recipe):
            kept += 1
            continue
        if (why := why_not_kept(path, recipe)) is not None:
            remade.append((path, why))
        forget(path)
    if kept:
        print(f"eval: keeping {kept} of {len(planned)} videos an earlier run made in {out / 'videos'} from the same "
              f"model, adapter and settings; making {len(planned) - kept}", flush=True)
    if remade:  # say why, or a rerun after an upgrade or a changed setting seems to ignore what it made
        path, why = remade[0]
        print(f"eval: making again {len(remade)} video{'s' * (len(remade) != 1)} an earlier run left in "
              f"{out / 'videos'}; the first, {path.relative_to(out / 'videos')}: {why}", flush=True)
    return kept


def planned_videos(systems: list[System], prompt_count: int, seeds) -> list[tuple[System, int, int]]:
    """Every (system, prompt index, seed) an eval generates, in the order one process makes them and eval.json
    lists them: system by system, so a pipeline going down the list (or down a stretch of it: a Ray worker's)
    swaps its slot only where the system changes."""
    return [(system, prompt, seed) for system in systems for prompt in range(prompt_count) for seed in seeds]


def forget_reports(out: Path) -> None:
    """Remove an earlier run's eval.json, eval.md and report.html from `out`: once this eval has removed the videos
    not made from its recipes, or before it has made the rest, they would point at videos that are not there; the
    reports are written again, whole, when the eval ends."""
    from trainer.evaluate.report import REPORT_FILES

    for name in REPORT_FILES.values():
        (out / name).unlink(missing_ok=True)


def generate(generator, planned: list[tuple[System, int, int]], video_recipes: list[dict],
             layouts: dict[str, TicftLayout | None], prompts: list[str], conditions: list[Path], params,
             options: EvalOptions, out: Path, timer: PhaseTimes) -> list[Video]:
    """The videos of `planned` (`planned_videos`, or a stretch of it), in its order; `video_recipes`: theirs
    (`recipes_of`). Each is made from its own settings and seed alone (the engine seeds every generation afresh
    and puts the item's adapter in the slot), so it is the same video whichever pipeline, and whatever came
    before it, makes it. A video already at its path from the same recipe (an interrupted earlier run's, a lost
    Ray attempt's) is kept, not made again; each video made is written whole, then its recipe."""
    videos = []
    progress = bar(len(planned), "generate", "video")
    started = time.perf_counter()
    for (system, index, seed), recipe in zip(planned, video_recipes, strict=True):
        path = video_path(out, system.name, index, seed)
        if made_earlier(path, recipe):
            videos.append(Video(system.name, index, seed, path))
            progress.update(1)
            continue

        def on_step(done: int, total: int) -> None:
            progress.set_postfix(system=system.name, prompt=index, seed=seed, step=f"{done}/{total}")

        frames = generator.generate_frames(video_params(system, index, seed, layouts, prompts, conditions, params),
                                           on_step)
        write_mp4_atomic(frames, path, params.fps)
        record(path, recipe)
        videos.append(Video(system.name, index, seed, path))
        progress.update(1)
    progress.close()
    timer.add("generate", started)
    return videos


def score_videos(videos: list[Video], prompts: list[str], options: EvalOptions, definitions: dict, timer: PhaseTimes) -> None:
    """Per-video metrics, one evaluation model loaded at a time; each pass decodes the mp4s again rather
    than holding every video in memory (120 videos of 49 x 480 x 720 would be 6 GB)."""
    if "clip" in options.metrics:
        from slapgen.evaluation.clip_score import ClipScorer
        from slapgen.evaluation.models import load_clip

        scorer = ClipScorer(load_clip(options.clip_model, options.device))
        coverage = [scorer.text_coverage(prompt) for prompt in prompts]
        started = time.perf_counter()
        for video in progress_over(videos, scorer.metric_name):
            video.scores[scorer.metric_name] = scorer.score(read_mp4(video.path)[0], prompts[video.prompt])
        timer.add(scorer.metric_name, started)
        truncated = sum(c.truncated for c in coverage)
        read_share = float(np.mean([c.scored / c.tokens for c in coverage]))
        definitions[scorer.metric_name] = {
            "higher_is_better": True, "model": options.clip_model,
            "what": f"torchmetrics' CLIP score: max(0, mean over {scorer.frames_per_video} evenly sampled frames of "
                    "100 x cos(image, text)) against the prompt the video was generated from",
            "text": f"the prompt's first {scorer.clip.text_window} CLIP tokens (start and end tokens kept): {truncated} of "
                    f"{len(prompts)} prompts were longer and were cut, {read_share:.0%} of prompt tokens read on average; "
                    "for long captions use --clip-model zer0int/LongCLIP-L-Diffusers (248 tokens)",
            "prompts_truncated": truncated, "prompt_tokens_read": read_share}
        del scorer
    if "temporal" in options.metrics:
        from slapgen.evaluation.models import load_dino
        from slapgen.evaluation.temporal import DinoFeatures, subject_consistency, temporal_flickering

        dino = DinoFeatures(load_dino(options.dino_model, options.device))
        for video in progress_over(videos, f"{SUBJECT}, {FLICKER}"):
            frames = read_mp4(video.path)[0]
            started = time.perf_counter()
            video.scores[SUBJECT] = subject_consistency(dino(frames))
            timer.add(SUBJECT, started)
            started = time.perf_counter()
            video.scores[FLICKER] = temporal_flickering(frames)
            timer.add(FLICKER, started)
        definitions[SUBJECT] = {"higher_is_better": True, "model": options.dino_model,
                                "what": "VBench subject consistency: mean over frames i>=1 of (max(0, cos(f_i-1, f_i)) + "
                                        "max(0, cos(f_0, f_i))) / 2 on DINO CLS features"}
        definitions[FLICKER] = {"higher_is_better": True, "model": None,
                                "what": "VBench temporal flickering: (255 - mean absolute difference of consecutive "
                                        "uint8 frames) / 255; 1.0 for a still video, so judge it next to motion"}


def progress_over(items: list, description: str):
    from trainer.progress import progress_bar

    return progress_bar(items, desc=description, unit="video", dynamic_ncols=True)


def fvd_per_system(videos: list[Video], entries, data: DataConfig, options: EvalOptions, definitions: dict,
                   timer: PhaseTimes) -> dict[str, dict]:
    """Each system's generated clips against the held-out clips, as the VAE saw them (same frames, size, fps)."""
    from slapgen.evaluation.i3d import FVD_FRAMES, I3DFeatures
    from slapgen.evaluation.models import load_i3d

    features = I3DFeatures(load_i3d(options.i3d_model, options.device), options.device)
    started = time.perf_counter()
    real = []
    for entry in progress_over(entries, "fvd: held-out clips"):
        clip = load_clip(entry.clip.video, data.num_frames, data.fps, data.height, data.width)  # (F, C, H, W) in [-1, 1]
        real.append(features(((clip.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()))
    generated: dict[str, list[np.ndarray]] = {}
    for video in progress_over(videos, FVD):
        generated.setdefault(video.system, []).append(features(read_mp4(video.path)[0]))
    real_features = np.stack(real)
    results = {system: frechet_with_interval(np.stack(rows), real_features) for system, rows in generated.items()}
    timer.add(FVD, started)
    dim = real_features.shape[1]
    smallest = min([len(real)] + [len(rows) for rows in generated.values()])
    warning = None
    if smallest < reliable_sample_count(dim):
        # Both counts said: "4 clips per set" read wrong beside a table of 8 generated and 4 real.
        made = sorted({len(rows) for rows in generated.values()})
        counts = f"{len(real)} held-out clip{'s' * (len(real) != 1)} and {'/'.join(map(str, made))} generated per system"
        warning = (f"only {counts} for {dim}-dimensional I3D features: the covariances are singular and FVD is "
                   "dominated by small-sample bias; compare FVDs only at equal counts (published FVDs use 2048)")
    definitions[FVD] = {"higher_is_better": False, "model": options.i3d_model,
                        "what": f"Frechet distance between Gaussians fitted to I3D features (StyleGAN-V's TorchScript I3D, "
                                f"first {FVD_FRAMES} frames, rescale/resize by the model) of a system's videos and of the "
                                "held-out clips; interval: 95% bootstrap over both sets",
                        "n_real": len(real), "warning": warning}
    return {system: result.to_json() for system, result in results.items()}


def assemble(options: EvalOptions, model: str, params, systems: list[System], layouts: dict[str, TicftLayout | None],
             entries, prompts: list[str], losses: dict[str, list[float]], videos: list[Video], fvd: dict,
             definitions: dict, engine: dict, timer: PhaseTimes) -> dict:
    per_video = [name for name in definitions if name not in (HELDOUT_LOSS, FVD)]
    result_systems = {}
    has_base = any(system.name == BASE for system in systems)
    for system in systems:
        own = [video for video in videos if video.system == system.name]
        scored = per_video if own else []  # --generate-top: a checkpoint left out has its held-out loss only
        values = {}
        if losses:
            values[HELDOUT_LOSS] = float(np.mean(losses[system.name]))
        for name in scored:
            values[name] = float(np.mean([video.scores[name] for video in own]))
        if system.name in fvd:
            values[FVD] = fvd[system.name]["value"]
        result_systems[system.name] = {
            "adapter": str(system.weights) if system.weights else None,
            "metrics": values,
            **({"ticft_layout": str(layouts[system.name])} if layouts[system.name] else {}),
            **({TICFT_BASE_LOSSES: base_ticft_losses(losses)} if system.name == BASE and base_ticft_losses(losses) else {}),
            **({"fvd_i3d_detail": fvd[system.name]} if system.name in fvd else {}),
            **({"ab_vs_base": ab_vs_base(system.name, losses, videos, scored, definitions,
                                         loss_reference(layouts[system.name]))}
               if has_base and system.name != BASE else {}),
        }
    count = max(len(videos), 1)
    made = len(videos) - engine.get("videos_kept", 0)  # kept videos took no generation time in this run
    seconds_per_video = {"generate": timer.seconds.get("generate", 0.0) / made} if made else {}
    for name in per_video + ([FVD] if fvd else []):
        seconds_per_video[name] = timer.seconds[name] / (count + (len(entries) if name == FVD else 0))
    if losses:
        # One per system and held-out clip, base@LAYOUT included.
        measured = len(losses) - engine.get("losses_kept", 0)  # kept losses took no time in this run
        if measured:
            seconds_per_video[HELDOUT_LOSS + "_per_clip"] = timer.seconds[HELDOUT_LOSS] / (measured * len(entries))
    return {
        "format": FORMAT,
        "model": model,
        "heldout": str(options.heldout),
        "seeds": list(options.seeds),
        **({"trigger_word": options.trigger_word} if options.trigger_word else {}),
        "generation": {key: value for key, value in asdict(params).items() if key not in ("prompt", "seed", "adapter")},
        "engine": engine,
        "metric_definitions": definitions,
        "systems": result_systems,
        "prompts": [{"index": k, "video": entry.clip.name, "caption": prompts[k],
                     **({HELDOUT_LOSS: {s: losses[s][k] for s in losses}} if losses else {})}
                    for k, entry in enumerate(entries)],
        "videos": [{"system": v.system, "prompt": v.prompt, "seed": v.seed, "path": str(v.path.relative_to(options.out)),
                    **v.scores} for v in videos],
        "timing_s": timer.seconds,
        "seconds_per_video": seconds_per_video,
    }


def base_ticft_losses(losses: dict[str, list[float]]) -> dict[str, float]:
    """The base model's mean held-out loss on each TIC-FT adapter's objective, by layout."""
    prefix = loss_reference(None) + "@"
    return {name.removeprefix(prefix): float(np.mean(values)) for name, values in losses.items() if name.startswith(prefix)}


def ab_vs_base(system: str, losses: dict, videos: list[Video], per_video: list[str], definitions: dict,
               loss_base: str = BASE) -> dict:
    """Per prompt (and seed), does `system` beat `base` on each metric? Win rate, interval over prompts, sign test.
    `loss_base`: the key of the base model's held-out losses on `system`'s objective (`base@LAYOUT` for TIC-FT)."""
    results = {}
    if losses:
        comparisons = [stats.Comparison(str(k), stats.outcome(mine, base, higher_is_better=False))
                       for k, (mine, base) in enumerate(zip(losses[system], losses[loss_base], strict=True))]
        results[HELDOUT_LOSS] = stats.win_rate(comparisons).to_json()
    base_videos = {(v.prompt, v.seed): v for v in videos if v.system == BASE}
    for name in per_video:
        higher = definitions[name]["higher_is_better"]
        comparisons = [stats.Comparison(str(v.prompt), stats.outcome(v.scores[name], base_videos[(v.prompt, v.seed)].scores[name], higher))
                       for v in videos if v.system == system]
        results[name] = stats.win_rate(comparisons).to_json()
    return results
