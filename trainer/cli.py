"""`slapgen` command line: demo-data, caption, curate, precompute, train, eval, generate, sweep, campaign (create,
list, delete), config.

Every subcommand has --help; bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import errno
import sys
from pathlib import Path

from slapgen.errors import SlapgenError
from slapgen.names import CRITERIA, NAME_RULE
from trainer.errors import STORAGE_FIXES, DatasetError, EvalError, OutFolderError
from trainer.option_hints import HintingParser
from trainer.evaluate.names import HELDOUT_LOSS_SEED
from trainer.ray_cluster import check_gpus_option, check_node_wait_option


def quiet_libraries() -> None:
    # Long captions are truncated to the model's token limit on purpose; the per-clip warnings
    # from transformers/diffusers would bury the progress bar.
    from slapgen.expected_warnings import silence_expected_warnings

    silence_expected_warnings()  # torchao's expected CPU warnings, as the service silences them
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def cmd_demo_data(args) -> int:
    from trainer.demo_data import write_demo_dataset

    written = write_demo_dataset(args.out, clips=args.clips, seed=args.seed)
    kept = args.clips - len(written)
    print(f"wrote {len(written)} clip{'s' * (len(written) != 1)} + caption{'s' * (len(written) != 1)} to {args.out}"
          + (f" (kept the {kept} already there, captions as they are)" if kept else ""))
    return 0


def check_demo_data(args) -> None:
    from trainer.demo_data import check_demo_target

    check_demo_target(args.out, args.clips)


def cmd_precompute(args) -> int:
    from slapgen.models.loading import TRAINER_SETTING, ModelSetting, resolve_model
    from trainer.config import load_config
    from trainer.datasets import read_training_clips
    from trainer.latent_cache import LatentCache

    config = load_config(args.config, precompute_overrides(args))
    setting = ModelSetting("--model", "use --model ") if args.model else TRAINER_SETTING
    resolved = resolve_model(config.model, config.model_cache_dir, setting=setting)
    clips = read_training_clips(args.dataset, config.data.max_clips, config.data.trigger_word)
    report = LatentCache(args.out, resolved, config.data, device=args.device, ticft=config.ticft).precompute(clips)
    # stdout is only the skipped clips, as JSON (`[]` when none), so it can be piped; the summary is for people.
    print(report.summary(), file=sys.stderr)
    print(json.dumps(report.skipped, indent=2))
    return 0 if report.entries else 1


def check_precompute(args) -> None:
    from trainer.config import load_config
    from trainer.datasets import check_dataset_exists

    load_config(args.config, precompute_overrides(args))
    check_dataset_exists(args.dataset)


def precompute_overrides(args) -> list[str]:
    """--set, and --model as one more (`model=...`)."""
    return [f"model={args.model}", *args.set] if args.model else args.set


def check_train(args) -> None:
    """What training checks again after its imports, checked before them: a mistyped model, a dataset's problems or
    a `--resume` with nothing to resume took 5 s of torch and diffusers to be said (a walk-through's timings)."""
    from slapgen.models.loading import TRAINER_SETTING, check_model_name
    from trainer.config import load_config
    from trainer.datasets import check_dataset_exists, read_training_clips
    from trainer.run_folder import check_new_start, check_out_folder, first_process, train_lock

    config = load_config(args.config, args.set)  # the preset's name and every --set (load_config_for_run may download)
    check_model_name(config.model, TRAINER_SETTING)
    check_dataset_exists(args.data)
    check_out_folder(args.out, args.data)
    # The run folder and the dataset, by the launch's first process alone: another process of the launch may start
    # after it has taken the lock and written the run's first files (training checks every process, before the
    # barrier the first writes wait for), and the dataset's problems are said once, not once per process.
    if first_process():
        train_lock(args.out).check_free()  # a running training's folder is that, not a folder holding a run
        check_new_start(args.out, args.resume, args.overwrite)
        # The captions read (and at most a few uncaptioned clips opened); training reads them again, in every process
        # (milliseconds for thousands of caption files, beside the imports this check saves on a mistake).
        read_training_clips(args.data, config.data.max_clips, config.data.trigger_word)


def cmd_train(args) -> int:
    from trainer.config import load_config_for_run
    from trainer.train import train

    from trainer.run_folder import where_to_look_next

    config = load_config_for_run(args.config, args.set)
    final = train(config, args.data, args.out, resume=args.resume, stop_at_step=args.stop_at_step,
                  overwrite=args.overwrite)
    if final is not None:  # None: stopped early (it said how to continue), or not the main process
        for line in where_to_look_next(args.out, config.model, config.logging.tensorboard, config.ticft is not None):
            print(line)
    return 0


def check_curate(args) -> None:
    from trainer.config import load_config
    from trainer.curate.selection import WHOLE_SELECTIONS
    from trainer.datasets import check_dataset_exists

    if isinstance(args.select, int) and args.select < 1:
        raise DatasetError(f"--select must be at least 1, {' or '.join(WHOLE_SELECTIONS)}")
    if args.select in WHOLE_SELECTIONS and args.hard_negatives:
        raise DatasetError(f"--hard-negatives reserves part of a selection of N clips; --select {args.select} takes "
                           "every clip it names, hard negatives among them")
    if args.workers is not None and args.workers < 1:
        raise DatasetError("--workers must be at least 1")
    if not 0 <= args.hard_negatives <= 1:
        raise DatasetError("--hard-negatives must be a share between 0 and 1, e.g. 0.2")
    if args.hard_negatives and args.select is None:
        raise DatasetError("--hard-negatives reserves part of a selection: give --select N too")
    load_config(args.config, args.set)
    check_dataset_exists(args.dataset)


def cmd_curate(args) -> int:
    from slapgen.errors import counted, first_names
    from trainer.config import load_config
    from trainer.curate import CurateSettings, curate
    from trainer.curate.selection import WHOLE_SELECTIONS
    from trainer.datasets import CURATE_PAGE, CURATE_SELECTION

    data = load_config(args.config, args.set).data
    settings = CurateSettings(num_frames=data.num_frames, fps=data.fps, workers=args.workers, select=args.select,
                              hard_negative_share=args.hard_negatives)
    report = curate(args.dataset, args.out, settings)
    summary = report["summary"]
    print(
        f"{counted(summary['clips'], 'clip')}: {summary['clean']} clean, {summary['flagged']} flagged, "
        f"{summary['without_caption']} without a caption; {summary['clips_per_second']} clips/s"
    )
    if summary["from_probe_cache"]:
        print(f"  {counted(summary['from_probe_cache'], 'clip')} not decoded again: unchanged since an earlier curate "
              f"into {args.out} measured them ({args.out / 'probes.sqlite'})")
    for code, count in summary["issues"].items():
        # too_short depends on the config: say which length, so a clip list all flagged is not a mystery.
        why = (f" (fewer than {data.num_frames} frames at {data.fps:g} fps, the training length of --config "
               f"{args.config})") if code == "too_short" else ""
        print(f"  {code}: {count}{why}: {first_names([clip['video'] for clip in report['clips'] if code in clip['issues']])}")
    if summary["longer_than_trained"]:
        print(f"  {counted(summary['longer_than_trained'], 'clean clip')} run more than twice the "
              f"{summary['trained_seconds']:g} s training reads from a clip's start; the rest of each is never trained "
              "(cut long clips into clips of that length to train on all of them)")
    if report["not_read"]:
        print(f"  not read: {len(report['not_read'])} ({first_names([entry['path'] for entry in report['not_read']])}):"
              f" {report['not_read'][0]['why']}" + ("; the others' reasons are in the report" if len(report["not_read"]) > 1 else ""))
    if args.select:
        hard = summary["hard_negatives_selected"]
        # counted whether or not --hard-negatives kept a share for them: say which, or "hard negatives" reads as asked for
        asked = WHOLE_SELECTIONS.get(args.select, f"{args.select} requested")
        print(f"selected {summary['selected']} ({asked}) -> {args.out / CURATE_SELECTION}"
              f" ({hard} of them {'a hard negative' if hard == 1 else 'hard negatives'}: miss, foul, block/absorb"
              f"{'' if args.hard_negatives else '; none kept for them: --hard-negatives SHARE does'})"
              + (f"; none is {'readable' if args.select == 'usable' else 'clean'} (the flags above say why), so no "
                 "training can use it" if not summary["selected"] else ""))
    if report["removed_from_earlier_run"]:
        print(f"removed what an earlier curate left in {args.out}: {', '.join(report['removed_from_earlier_run'])}")
    print(f"report: {args.out / CURATE_PAGE}")
    return 0


def check_trigger_word_option(word: str | None) -> str | None:
    from trainer.errors import EvalError
    from trainer.trigger_word import check_trigger_word

    try:
        return check_trigger_word(word)
    except ValueError as error:
        raise EvalError(f"--trigger-word: {error}") from None


def eval_options(args):
    """slapgen eval's options, every one checked: for the check before the heavy imports, and for the run."""
    from trainer.evaluate.options import (EvalOptions, default_model_sources, parse_adapter, parse_metrics, parse_seeds,
                                          parse_settings)
    from trainer.datasets import check_dataset_exists
    from trainer.evaluate.ray_shards import check_workers_option

    if args.max_clips is not None and args.max_clips < 1:
        raise DatasetError("--max-clips must be at least 1")
    sources = default_model_sources(args.model)
    options = EvalOptions(
        model=args.model,
        adapters=tuple(parse_adapter(text) for text in args.adapter),
        heldout=args.heldout,
        out=args.out,
        metrics=parse_metrics(args.metrics),
        seeds=parse_seeds(args.seeds or "0"),
        generation=parse_settings(args.set),
        max_clips=args.max_clips,
        trigger_word=check_trigger_word_option(args.trigger_word),
        cache=args.cache,
        device=args.device,
        loss_seed=args.loss_seed,
        clip_model=args.clip_model or sources["clip_model"],
        dino_model=args.dino_model or sources["dino_model"],
        i3d_model=args.i3d_model or sources["i3d_model"],
        checkpoints=args.checkpoints,
        generate_top=args.generate_top,
        pick_by=args.pick_by,
        ray=args.ray,
        gpus_per_run=check_gpus_option(args.gpus_per_run, args.ray, "eval generates every video in this process"),
        workers=check_workers_option(args.workers, args.ray),
        node_wait_s=check_node_wait_option(args.node_wait, args.ray, "eval generates every video in this process"),
    )
    if args.seeds is not None and not options.generates:  # accepted without a word, and no video was made
        raise EvalError(f"--seeds are the seeds videos are generated with, and --metrics {args.metrics} generates "
                        "none: add clip, fvd or temporal to --metrics")
    check_dataset_exists(args.heldout)  # after what was typed: a misspelt option is the likelier mistake
    return options


def check_eval(args) -> None:
    eval_options(args)


def cmd_eval(args) -> int:
    # Imported here: `slapgen eval` is the one command that loads the generation engine.
    from trainer.evaluate.names import metrics_line
    from trainer.evaluate.report import ticft_base_sentences, write_reports
    from trainer.evaluate.run import run_eval

    result = run_eval(eval_options(args))
    paths = write_reports(result, args.out)
    for system, data in result["systems"].items():
        print(f"{system}: {metrics_line(data['metrics'])}")
    for sentence in ticft_base_sentences(result):
        print(sentence)
    if "checkpoints" in result:
        from trainer.evaluate.curves import best_sentence

        for adapter, entry in result["checkpoints"]["runs"].items():
            print(best_sentence(adapter, entry))
            print(f"{adapter}: {entry['overfitting']['sentence']}")
    for definition in result["metric_definitions"].values():
        if definition.get("warning"):
            print(f"warning: {definition['warning']}")
    print(f"report: {paths['html']} (also {paths['json'].name}, {paths['md'].name})")
    return 0


def cmd_generate(args) -> int:
    # Imported here, as for eval: the generation engine loads only for the commands that generate.
    from trainer.generate import generate_video

    made = generate_video(generate_options(args))
    layout = f", TIC-FT {made['ticft_layout']}" if made["ticft_layout"] else ""
    print(f"wrote {made['path']}: {made['frames']} frames of {made['height']}x{made['width']} at {made['fps']} fps, "
          f"seed {made['seed']}{layout}; {made['generate_seconds']:.1f} s to generate ({made['load_seconds']:.1f} s to load)")
    return 0


def check_generate(args) -> None:
    """What generate can check without torch (the mp4's name, the seed, the caption from --prompt or --template
    and --slot, the files named) and its --set values: a mistake there is said before the seconds of imports."""
    from trainer.generate import check_options

    check_options(generate_options(args))


def generate_options(args):
    from trainer.evaluate.options import parse_settings
    from trainer.generate import GenerateOptions, parse_slots

    return GenerateOptions(
        model=args.model, out=args.out, prompt=args.prompt, template=args.template, slots=parse_slots(args.slot),
        adapter=args.adapter, condition_image=args.condition_image, include_condition_frames=args.include_condition_frames,
        seed=args.seed, settings=parse_settings(args.set, chooser="its own option (--prompt, --seed, --adapter)"),
        device=args.device, quantization=args.quantization)


def sweep_options(args) -> dict:
    """slapgen sweep's options besides the config, the grid and the folders (which `plan_sweep` checks)."""
    from trainer.sweep.candidates import CandidateRequest
    from trainer.sweep.evaluate import EvalRequest

    return {
        "metrics": [name.strip() for name in args.metrics.split(",") if name.strip()],
        "request": EvalRequest(seeds=args.seeds, sets=tuple(args.eval_set), clip_model=args.clip_model,
                               dino_model=args.dino_model, i3d_model=args.i3d_model),
        "candidates": CandidateRequest(checkpoints=args.checkpoints, generate_top=args.generate_top,
                                       pick_by=args.pick_by),
        "gpus_per_run": check_gpus_option(args.gpus_per_run, args.ray, "the sweep runs one run per GPU of this machine"),
        "node_wait_s": check_node_wait_option(args.node_wait, args.ray, "the sweep runs one run per GPU of this machine"),
    }


def check_sweep(args) -> None:
    from trainer.sweep.sweep import plan_sweep

    options = sweep_options(args)
    plan_sweep(args.config, args.set, args.grid, args.data, args.heldout, args.out, options["metrics"],
               options["request"], options["candidates"], resolve_models=False)  # nothing downloaded, as train's


def cmd_sweep(args) -> int:
    from trainer.sweep.sweep import run_sweep

    options = sweep_options(args)
    run_sweep(args.config, args.set, args.grid, args.data, args.heldout, args.out, options["metrics"],
              request=options["request"], candidates=options["candidates"], ray=args.ray,
              gpus_per_run=options["gpus_per_run"], node_wait_s=options["node_wait_s"])
    return 0


def check_caption(args) -> None:
    from trainer.datasets import check_caption_folder

    if args.fps <= 0:
        raise DatasetError("--fps must be positive")
    if args.max_frames < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise DatasetError("--max-frames and --max-new-tokens must be at least 1")
    check_caption_folder(args.dataset)


def cmd_caption(args) -> int:
    from trainer.captioning.run import CaptionSettings, caption_dataset

    settings = CaptionSettings(model=args.model, device=args.device, fps=args.fps, max_frames=args.max_frames,
                               max_new_tokens=args.max_new_tokens, overwrite=args.overwrite,
                               retry_flagged=args.retry_flagged, seed=args.seed)
    summary = caption_dataset(args.dataset, settings)
    rate = f"; {len(summary.captioned) + len(summary.flagged)} clips in {summary.seconds:.1f} s" if summary.seconds else ""
    print(f"captioned {len(summary.captioned)} clips, flagged {len(summary.flagged)} (retried {summary.retried}), "
          f"left {summary.skipped} alone{rate}")
    if summary.flagged:
        print(f"flagged clips and why: {args.dataset / '.slapgen-captions.json'}")
    return 0


def cmd_campaign_create(args) -> int:
    from slapgen.evaluation.leaderboard import left_out_sentences
    from slapgen.serving.settings import load_settings
    from trainer.campaign import create_campaign, few_prompts_sentence

    def names(text):
        return None if text is None else [part.strip() for part in text.split(",") if part.strip()]

    settings = load_settings()  # the service's store: SLAP_DATA_DIR (default SLAP_CACHE_DIR/data), SLAP_DATABASE_URL
    data_dir = settings.data_dir
    campaign, notes = create_campaign(data_dir, args.name, args.sources, names(args.systems), names(args.criteria),
                                      args.budget, database=settings.database_url)
    print(f"campaign {campaign.name}: {len(campaign.systems)} systems ({', '.join(campaign.systems)}), "
          f"{len(campaign.items)} prompt/seed items, criteria {', '.join(campaign.criteria)}, budget "
          f"{campaign.budget} ratings, in {settings.where_campaigns_are()}; its videos copied to "
          f"{(data_dir / 'campaigns' / campaign.name).absolute()}")
    if unshared := settings.unshared_data_dir():
        print(f"warning: {unshared}")
    for sentence in left_out_sentences(campaign.metrics_left_out):  # said now, not first on the leaderboard
        print(sentence)
    if few := few_prompts_sentence(campaign.items, campaign.budget):
        print(few)
    for note in notes:
        print(note)
    # What to do next: a campaign made in a store the service does not open was rated nowhere (a walk-through forgot
    # SLAP_DATA_DIR here and found the server listing other campaigns). The videos are in SLAP_DATA_DIR whatever the
    # database: a server given only the database's URL lists the campaign and answers 404 for every video.
    store = f"SLAP_DATA_DIR={data_dir.absolute()}" + (" and the same SLAP_DATABASE_URL" if settings.database_url else "")
    print(f"next: serve with {store} (`bentoml serve`); raters open /studio/ and choose Campaigns; the results: "
          f"GET /campaigns/{campaign.name}/leaderboard")
    return 0


def cmd_campaign_list(args) -> int:
    from slapgen.serving.settings import load_settings
    from trainer.campaign import campaign_lines

    settings = load_settings()  # the store create writes
    lines, where = campaign_lines(settings), settings.where_campaigns_are()
    print(f"campaigns in {where}:" if lines else f"no campaigns in {where}")
    for line in lines:
        print(f"  {line}")
    return 0


def cmd_campaign_delete(args) -> int:
    from slapgen.campaign_store import ratings_phrase
    from slapgen.errors import counted
    from slapgen.serving.settings import load_settings
    from trainer.campaign import delete_campaign

    settings = load_settings()
    where = settings.where_campaigns_are()
    deleted = delete_campaign(settings, args.name, args.yes)

    lost = ratings_phrase(deleted.ratings, deleted.repeats, deleted.raters) if deleted.raters else "0 ratings"
    print(f"deleted campaign {deleted.name} from {where}: {counted(deleted.videos, 'video')}, "
          f"{counted(deleted.pairs, 'issued pair')}, {lost}")
    return 0


def cmd_ratings_list(args) -> int:
    from slapgen.serving.settings import load_settings
    from trainer.ratings import rating_model_lines

    settings = load_settings()  # the store the service writes
    lines, where = rating_model_lines(settings), settings.where_ratings_are()
    # The studio's A/B ratings: a campaign's are its own (a walk-through read "no ratings" beside 42 campaign verdicts)
    print(f"studio ratings in {where}, per model:" if lines else
          f"no studio ratings in {where} (a campaign's ratings: `slapgen campaign list`)")
    for line in lines:
        print(f"  {line}")
    return 0


def cmd_ratings_assign_model(args) -> int:
    from slapgen.serving.settings import load_settings
    from trainer.ratings import assign_ratings_model

    print(assign_ratings_model(load_settings(), args.model, args.recorded, merge=args.yes))
    return 0


def cmd_config(args) -> int:
    from trainer.config import load_config

    print(load_config(args.preset, args.set).to_documented_yaml(), end="")
    return 0


# The models a --model option takes; the built-in tiny twins run on a CPU without a download.
MODEL_CHOICES = "hub id, local pipeline folder, `tiny` or `tiny-wan`"


def selection_size(text: str) -> int | str:
    """curate's --select: a number of clips, `all` (every clean clip) or `usable` (every clip training can read)."""
    from trainer.curate.selection import WHOLE_SELECTIONS  # here, not at the top: the curate package loads numpy

    if text.strip().lower() in WHOLE_SELECTIONS:
        return text.strip().lower()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of clips, {' or '.join(WHOLE_SELECTIONS)}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    # Subcommands' parsers are of the same class: every error names what a mistyped option likely meant.
    parser = HintingParser(prog="slapgen", description="Teach CogVideoX or Wan a new video domain with LoRA.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-data", help="write a small synthetic powerslap dataset (mp4 + captions)")
    demo.add_argument("out", type=Path, help="folder to write clip_NNN.mp4 / clip_NNN.txt into")
    demo.add_argument("--clips", type=int, default=8, help="number of clips (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the scene variations")
    demo.set_defaults(run=cmd_demo_data, check=check_demo_data)

    cur = commands.add_parser("curate", help="report caption quality, bad clips and duplicates; select the best N")
    cur.add_argument("dataset", type=Path, help="folder (videos.txt+prompts.txt or clip.mp4+clip.txt) or .csv/.jsonl")
    cur.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.html, selected.jsonl)")
    cur.add_argument("--select", type=selection_size, metavar="N",
                     help="write the N best clean clips to OUT/selected.jsonl (all: every clean clip; usable: every clip "
                          "training can read, quality flags and all)")
    cur.add_argument("--hard-negatives", type=float, default=0.0, metavar="SHARE",
                     help="share of --select kept for failed strikes and defensive moves (miss, foul, block/absorb), e.g. 0.2")
    cur.add_argument("--workers", type=int, help="processes probing clips (default: one per core this process may use: "
                                                 "its CPU affinity, capped by a container's CPU limit)")
    cur.add_argument("--config", default="conservative",
                     help="training config or preset whose data section sets the training length (default conservative)")
    cur.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    cur.set_defaults(run=cmd_curate, check=check_curate)

    cap = commands.add_parser("caption", help="caption the clips of a folder that have none, with a video-language model")
    cap.add_argument("dataset", type=Path, help="folder of clips; writes clip.txt beside each clip.mp4")
    cap.add_argument("--model", default="Qwen/Qwen3-VL-8B-Instruct",
                     help="`tiny`, a local model folder, or a hub id (default Qwen/Qwen3-VL-8B-Instruct)")
    cap.add_argument("--device", help="where to run the model (default: cuda when a GPU is there, else cpu)")
    cap.add_argument("--fps", type=float, default=2.0, help="frames per second shown to the model (default 2)")
    cap.add_argument("--max-frames", type=int, default=64, help="at most this many frames per clip (default 64)")
    cap.add_argument("--max-new-tokens", type=int, help="caption length limit in tokens (default: the model's, else 200)")
    cap.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    cap.add_argument("--retry-flagged", action="store_true", help="try again the clips an earlier run flagged")
    cap.add_argument("--seed", type=int, default=0, help="seed of the per-clip sampling")
    cap.set_defaults(run=cmd_caption, check=check_caption)

    pre = commands.add_parser("precompute", help="encode clips (VAE) and captions (T5) into a latent cache")
    pre.add_argument("dataset", type=Path, help="folder (videos.txt+prompts.txt or clip.mp4+clip.txt) or .csv/.jsonl")
    pre.add_argument("--model", help=f"{MODEL_CHOICES} (overrides the config)")
    pre.add_argument("--out", type=Path, required=True, help="cache folder (reused across runs)")
    pre.add_argument("--config", help="training config or preset whose data section sets resolution and frames")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    pre.add_argument("--device", help="where to run the encoders (default: cuda when a GPU is there, else cpu)")
    pre.set_defaults(run=cmd_precompute, check=check_precompute)

    tr = commands.add_parser("train", help="train a LoRA; writes RUN_DIR/pytorch_lora_weights.safetensors")
    tr.add_argument("--config", required=True, help="YAML file or preset name (conservative, aggressive, ticft, tiny-smoke)")
    tr.add_argument("--data", type=Path, required=True, help="dataset folder or .csv/.jsonl")
    tr.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics, validation, LoRA)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. lora.rank=64, or model=tiny-wan to train Wan (`slapgen config PRESET` lists every key)")
    tr.add_argument("--resume", metavar="latest|CHECKPOINT", help="continue from the latest or a given checkpoint")
    tr.add_argument("--overwrite", action="store_true",
                    help="start over in a run folder that holds a run: deletes its LoRA, checkpoints, metrics, logs and "
                         "validation videos (the latent cache stays)")
    tr.add_argument("--stop-at-step", type=int, metavar="N", help="checkpoint and stop after step N (resume later)")
    tr.set_defaults(run=cmd_train, check=check_train)

    ev = commands.add_parser("eval", help="compare the base model and adapters on a held-out dataset; writes eval.json, "
                                          "eval.md, report.html")
    ev.add_argument("--model", required=True, help=f"{MODEL_CHOICES} (as SLAP_MODEL)")
    ev.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="an adapter to compare with `base`: a LoRA file or a run / checkpoint folder (repeatable)")
    ev.add_argument("--heldout", type=Path, required=True, help="held-out dataset, any layout `slapgen train` reads")
    ev.add_argument("--out", type=Path, required=True, help="output folder (videos, eval.json, eval.md, report.html)")
    ev.add_argument("--metrics", default="loss,clip,fvd,temporal",
                    help="any of loss,clip,fvd,temporal (default all; loss alone generates nothing)")
    ev.add_argument("--seeds", help="generation seeds of clip/fvd/temporal, e.g. 1,2 (default 0)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="generation setting for every system: num_inference_steps, guidance_scale, negative_prompt, "
                         "num_frames, height, width, fps, adapter_scale (default: the model's)")
    ev.add_argument("--max-clips", type=int, metavar="N", help="use only the first N held-out clips")
    ev.add_argument("--trigger-word", metavar="WORD",
                    help="put into every held-out caption (the prompts) as training did; default: the word the adapters "
                         "were trained with (data.trigger_word, in their metadata)")
    ev.add_argument("--cache", type=Path, help="latent cache for the held-out clips (default OUT/cache; share it)")
    ev.add_argument("--device", help="where the model and metrics run (default: cuda when a GPU is there, else cpu)")
    ev.add_argument("--loss-seed", type=int, default=HELDOUT_LOSS_SEED,
                    help=f"seed of the held-out loss noise (default {HELDOUT_LOSS_SEED})")
    ev.add_argument("--clip-model", help="CLIP hub id or folder (default openai/clip-vit-large-patch14; tiny with --model tiny)")
    ev.add_argument("--dino-model", help="DINO hub id or folder (default facebook/dino-vitb16; tiny with --model tiny)")
    ev.add_argument("--i3d-model", help="I3D TorchScript file or hub repo (default flateon/FVD-I3D-torchscript; "
                                        "tiny with --model tiny)")
    ev.add_argument("--checkpoints", action="store_true",
                    help="each --adapter is a run folder: score every saved checkpoint and the final LoRA as systems "
                         "NAME@STEP, with curves over steps, the best checkpoint named and overfitting said")
    ev.add_argument("--generate-top", type=int, metavar="K",
                    help="with --checkpoints: held-out loss on every checkpoint, videos and generation metrics only on "
                         "the K with the lowest held-out loss over every run given (default: all)")
    ev.add_argument("--pick-by", metavar="METRIC",
                    help="with --checkpoints: the metric that names each run's best checkpoint, as eval.json names it "
                         "(default heldout_loss; e.g. clip_score_vitl14, fvd_i3d)")
    ev.add_argument("--ray", metavar="ADDRESS", help="generate the videos on a Ray cluster, spread over workers that "
                                                     "run as many at once as it has slots: auto (RAY_ADDRESS or the one "
                                                     "running here), local (start one for this eval) or HOST:PORT; --out "
                                                     "must be on storage every node sees")
    ev.add_argument("--gpus-per-run", type=float, help="GPUs each generation worker asks for (default 1; 0 for a "
                                                       "CPU-only cluster: one worker per CPU, as memory allows)")
    ev.add_argument("--workers", type=int, metavar="N", help="with --ray: cut the videos into N workers' stretches "
                                                             "(default: 4 per slot the cluster has at the start)")
    ev.add_argument("--node-wait", type=float, metavar="SECONDS",
                    help="with --ray: stop once no live node could run a worker for this long (default 1800)")
    ev.set_defaults(run=cmd_eval, check=check_eval)

    gen = commands.add_parser("generate", help="generate one video (text-to-video, or image-to-video with a TIC-FT "
                                                "adapter) through the service's engine; writes an mp4")
    gen.add_argument("--model", required=True, help=f"{MODEL_CHOICES} (as SLAP_MODEL)")
    gen.add_argument("--prompt", help="the caption (or use --template)")
    gen.add_argument("--template", help="a prompt template of prompts/templates.yaml, with --slot values (a name "
                                        "it does not know lists those it does; a server's GET /templates shows their "
                                        "slots)")
    gen.add_argument("--slot", action="append", default=[], metavar="NAME=VALUE", help="a template slot (repeatable)")
    gen.add_argument("--adapter", type=Path, help="a LoRA file, or a run / checkpoint folder holding one")
    gen.add_argument("--condition-image", type=Path, help="PNG or JPEG a TIC-FT adapter animates (resized and "
                                                          "cropped as training frames are)")
    gen.add_argument("--include-condition-frames", action="store_true",
                     help="TIC-FT: keep the condition's frames in the mp4 (default: the target frames only)")
    gen.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="num_inference_steps, guidance_scale, negative_prompt, num_frames, height, width, fps, "
                          "adapter_scale (default: the model's; a TIC-FT adapter's num_frames: its layout's)")
    gen.add_argument("--out", type=Path, required=True, help="the mp4 to write")
    gen.add_argument("--device", help="where the model runs (default: cuda when a GPU is there, else cpu)")
    gen.add_argument("--quantization", default="none", choices=["none", "auto", "fp8", "fp8-weight", "int8"],
                     help="torchao weight quantization of the transformer, as SLAP_QUANT (default none)")
    gen.set_defaults(run=cmd_generate, check=check_generate)

    sw = commands.add_parser("sweep", help="train every combination of a grid of settings, evaluate each, report the best")
    sw.add_argument("--config", required=True, help="YAML file or preset name every run starts from")
    sw.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                    help="a config field and its values, e.g. lora.rank=64,128,256 (repeat for more axes)")
    sw.add_argument("--data", type=Path, required=True, help="training dataset (folder or .csv/.jsonl)")
    sw.add_argument("--heldout", type=Path, required=True, help="held-out dataset every run is judged on")
    sw.add_argument("--out", type=Path, required=True, help="sweep folder, e.g. training_logs/NAME (rerun to continue)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a config value for every run")
    sw.add_argument("--metrics", default="loss", help="comma-separated, any of loss,clip,fvd,temporal; loss (held-out "
                                                      "loss) is always measured; the others generate videos (slapgen eval)")
    sw.add_argument("--seeds", help="generation seeds of clip/fvd/temporal, e.g. 1,2 (default 0)")
    sw.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                    help="generation setting of clip/fvd/temporal, as `slapgen eval --set`: num_inference_steps, "
                         "guidance_scale, negative_prompt, num_frames, height, width, fps, adapter_scale")
    sw.add_argument("--clip-model", help="as slapgen eval's (default openai/clip-vit-large-patch14; tiny with model tiny)")
    sw.add_argument("--dino-model", help="as slapgen eval's (default facebook/dino-vitb16; tiny with model tiny)")
    sw.add_argument("--i3d-model", help="as slapgen eval's (default flateon/FVD-I3D-torchscript; tiny with model tiny)")
    sw.add_argument("--checkpoints", action="store_true",
                    help="score every saved checkpoint of every run (and its final LoRA): the winner is a (run, step)")
    sw.add_argument("--generate-top", type=int, metavar="K",
                    help="with --checkpoints: generation metrics only for the K best checkpoints by held-out loss")
    sw.add_argument("--pick-by", default="heldout_loss", metavar="METRIC",
                    help="the metric that names the winner, as eval.json names it (default heldout_loss; e.g. "
                         "clip_score_vitl14, fvd_i3d, subject_consistency_dino, temporal_flickering)")
    sw.add_argument("--ray", metavar="ADDRESS", help="run every run as a Ray task on a cluster: auto (RAY_ADDRESS or the "
                                                     "one running here), local (start one for this sweep) or HOST:PORT; "
                                                     "--out must be on storage every node sees")
    sw.add_argument("--gpus-per-run", type=float, help="GPUs each run's Ray task asks for (default 1; 0 for a CPU-only cluster)")
    sw.add_argument("--node-wait", type=float, metavar="SECONDS",
                    help="with --ray: stop once no live node could run a run for this long (default 1800)")
    sw.set_defaults(run=cmd_sweep, check=check_sweep)

    camp = commands.add_parser("campaign", help="blind rating campaigns over the videos of eval / sweep runs")
    camp_commands = camp.add_subparsers(dest="campaign_command", required=True)
    create = camp_commands.add_parser("create", help="make a campaign in the service's data store (SLAP_DATA_DIR) from "
                                                     "eval folders' videos")
    create.add_argument("name", help=f"campaign name: {NAME_RULE}")
    create.add_argument("--from", dest="sources", action="append", type=Path, required=True, metavar="EVAL_DIR",
                        help="a folder `slapgen eval` wrote, a sweep's folder (base and every run) or a sweep run's "
                             "RUN/eval, when the sweep had generation metrics; repeatable")
    create.add_argument("--systems", metavar="A,B,...", help="the systems to rate (default: all of them)")
    create.add_argument("--criteria", metavar="C1,C2,...",
                        help=f"what raters judge, e.g. overall,motion_accuracy (default overall; the studio's: "
                             f"{','.join(CRITERIA)}; or names of your own)")
    create.add_argument("--budget", type=int, metavar="N",
                        help="ratings after which the campaign is done and issues no new pair "
                             "(default: every pair of systems once on every prompt and seed)")
    create.set_defaults(run=cmd_campaign_create)
    listing = camp_commands.add_parser("list", help="every campaign in the service's data store: systems, ratings "
                                                    "so far of its budget, raters")
    listing.set_defaults(run=cmd_campaign_list)
    remove = camp_commands.add_parser("delete", help="delete a campaign with its pairs, ratings and copied videos")
    remove.add_argument("name", help="the campaign (`slapgen campaign list` lists them)")
    remove.add_argument("--yes", action="store_true", help="delete it even though it has ratings (they are lost)")
    remove.set_defaults(run=cmd_campaign_delete)

    rat = commands.add_parser("ratings", help="the web studio's ratings in the service's data store, by model")
    rat_commands = rat.add_subparsers(dest="ratings_command", required=True)
    rat_commands.add_parser("list", help="verdicts per model, and those with no model recorded (stored before "
                                         "ratings recorded their model)").set_defaults(run=cmd_ratings_list)
    assign = rat_commands.add_parser("assign-model", help="give the ratings with no model recorded the model that made "
                                                          "them, so that its server's summary counts them")
    assign.add_argument("model", help="the model's name as its server's /info gives it (`model`), e.g. tiny or "
                                      "THUDM/CogVideoX-5b")
    assign.add_argument("--from", dest="recorded", metavar="MODEL",
                        help="assign the ratings recorded as this model instead (to mend an assignment to a model "
                             "that had none)")
    assign.add_argument("--yes", action="store_true",
                        help="assign them even though MODEL has ratings already (merged, they cannot be parted again)")
    assign.set_defaults(run=cmd_ratings_assign_model)

    cfg = commands.add_parser("config", help="print a preset or config file with every field documented")
    cfg.add_argument("preset", nargs="?", help="preset name or YAML file (default: built-in defaults)")
    cfg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    cfg.set_defaults(run=cmd_config)
    return parser


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Commands that load torch, diffusers or transformers: they say so at once, before the imports that
# take seconds (a minute on a cold disk), so a person sees that work has started.
LOADING_COMMANDS = ("caption", "precompute", "train", "eval", "generate", "sweep")  # what loads a model
# The commands whose --out (demo-data's OUT) is a folder they write into
FOLDER_OUT_COMMANDS = ("demo-data", "curate", "precompute", "train", "eval", "sweep")


def check_out_is_a_folder(out: Path) -> None:
    """A folder a command writes into named where a file (or a broken link) is, or inside one (a slip of the tab
    key): one sentence; it was mkdir's traceback (`FileExistsError`, `NotADirectoryError`) in train, eval, precompute
    and curate."""
    for place in (out, *out.parents):
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                what = "a broken link" if not place.exists() else "a file"
                said = f"{out} is {what}" if place == out else f"{out} is inside {place}, {what}"
                raise OutFolderError(f"{said}: the output goes into a folder (one that is not there is made)")
            return


VIDEO_COMMANDS = (*LOADING_COMMANDS, "curate", "demo-data")  # what reads or writes videos: each needs ffmpeg


def loading_line(command: str) -> str:
    """The first line of a loading command, on stderr (its stdout may be data: precompute's JSON)."""
    return f"slapgen {command}: loading torch and diffusers ..."


# What to type after a Ctrl-C, and what it redoes (`train`'s: `run_folder.after_interrupt`).
RESUME_ADVICE = {"sweep": "rerun the same command: finished runs are kept, the others resume from their latest "
                          "checkpoint",
                 # A video is kept only beside its recipe, equal to the rerun's (trainer/evaluate/recipes.py).
                 "eval": "rerun the same command: the held-out latent cache, the held-out losses measured and every "
                         "finished video are kept, and only what is missing is measured or generated"}


def main(argv: list[str] | None = None) -> int:
    from trainer.run_folder import first_process

    args = build_parser().parse_args(argv)  # no heavy import before here: --help and argument errors are instant
    try:
        if args.command in LOADING_COMMANDS and first_process():
            # at once (torch alone takes seconds); under `accelerate launch`, one line, not one per process
            print(loading_line(args.command), file=sys.stderr, flush=True)
        if args.command in VIDEO_COMMANDS:
            from slapgen.video import ffmpeg_problem

            if (problem := ffmpeg_problem()) is not None:
                raise DatasetError(problem)
        if args.command in FOLDER_OUT_COMMANDS or args.command == "generate":  # generate's: the mp4's folder
            check_out_is_a_folder(args.out if args.command in FOLDER_OUT_COMMANDS else args.out.parent)
        if (check := getattr(args, "check", None)) is not None:
            check(args)  # what was typed, checked before diffusers and transformers load (seconds more)
        if args.command in LOADING_COMMANDS:
            quiet_libraries()
        if getattr(args, "device", "") is None:
            args.device = default_device()
        return args.run(args)
    except SlapgenError as error:
        print(f"slapgen {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        from tqdm import tqdm

        from trainer.interrupt import stop_signal, stopped_by

        signum = stop_signal(error)  # training's stop asked by SIGTERM (a scheduler's) exits 143, as SIGTERM would
        if first_process():  # under `accelerate launch` (or MPI), one line, not one per process
            # Above the bar the Ctrl-C left open (a plain print was glued onto the end of its line).
            tqdm.write(f"slapgen {args.command}: {stopped_by(signum)}; finished work is kept ({how_to_continue(args)})",
                       file=sys.stderr)
        return 128 + signum
    except OSError as error:
        if error.errno not in STORAGE_FIXES:
            raise
        from tqdm import tqdm

        # A full disk or a read-only folder anywhere (latent cache, metrics, TensorBoard, videos): every file that
        # matters is written whole or not at all, so the work done is kept, as after a Ctrl-C.
        where = f" {error.filename}" if error.filename else ""
        verb = "cannot open" if error.errno == errno.EACCES else "cannot write"  # a permission stops reads too
        tqdm.write(f"slapgen {args.command}: {verb}{where}: {error.strerror}; {STORAGE_FIXES[error.errno]}, then "
                   f"{how_to_continue(args)}", file=sys.stderr)
        return 2


def how_to_continue(args) -> str:
    """What to type after a command stopped part-way, and what it redoes: `train`'s from what the run folder holds
    (--resume only with a checkpoint there, `run_folder.after_interrupt`), the others' from RESUME_ADVICE."""
    if args.command == "train":
        from trainer.run_folder import after_interrupt

        return after_interrupt(args.out, args.overwrite, args.resume)
    return RESUME_ADVICE.get(args.command, "run the same command again")


if __name__ == "__main__":
    sys.exit(main())
