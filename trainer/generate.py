"""`slapgen generate`: one video from the command line, through the engine the service runs.

The prompt (or a template with its slots), generation settings, an optional LoRA (a file, or a run or
checkpoint folder) and, for a TIC-FT adapter, the condition image (its layout read from the LoRA's
header): all checked here, with the engine's own rules, before the model loads. Then one
`VideoGenerator` (the service's engine, its checks and its TIC-FT re-injection) makes the frames and
the mp4 is written atomically. A TIC-FT adapter's clip length defaults to its
layout's; the mp4 holds its target frames (the whole clip with `include_condition_frames`).
"""

from __future__ import annotations

import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slapgen.errors import ImageError, SlapgenError, closest_path_hint
from trainer.errors import GenerateError

# Engine error fields -> the option a person typed.
OPTION_OF_FIELD = {"condition_image": "--condition-image", "adapter": "--adapter", "prompt": "--prompt",
                   "include_condition_frames": "--include-condition-frames", "num_frames": "--set num_frames"}


@dataclass(frozen=True)
class GenerateOptions:
    model: str
    out: Path
    prompt: str | None = None
    template: str | None = None
    slots: dict[str, str] = field(default_factory=dict)
    adapter: Path | None = None  # a LoRA file, or a run / checkpoint folder holding one
    condition_image: Path | None = None
    include_condition_frames: bool = False
    seed: int = 0
    settings: dict = field(default_factory=dict)  # validated --set values
    device: str = "cpu"
    quantization: str = "none"
    model_cache_dir: Path | None = None


def parse_slots(pairs: list[str]) -> dict[str, str]:
    slots = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise GenerateError(f"--slot {pair}: expected NAME=VALUE, e.g. --slot striker=red")
        slots[key.strip()] = value
    return slots


def adapter_name(path: Path) -> str:
    """A name for the adapter in messages and the engine's folder: a run's folder name, else the file's."""
    from slapgen.engine.adapters import ADAPTER_NAME_PATTERN

    path = path.resolve()
    stem = path.name if path.is_dir() else path.stem
    if stem == "pytorch_lora_weights":  # the trainer's file name says nothing; its run folder does
        stem = path.parent.name
    name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-")[:64]
    return name if ADAPTER_NAME_PATTERN.fullmatch(name) and name != "base" else "adapter"


def render_prompt(options: GenerateOptions) -> str:
    """The caption: --prompt as given, or --template rendered with --slot values (the service's library)."""
    if (options.prompt is None) == (options.template is None):
        raise GenerateError("give either --prompt or --template (with --slot NAME=VALUE), not both or neither")
    if options.slots and options.template is None:
        raise GenerateError("--slot is only used with --template")
    if options.prompt is not None:
        if not options.prompt.strip():
            raise GenerateError("--prompt is empty")
        return options.prompt
    from prompts import default_library

    return default_library().render(options.template, options.slots)


@contextmanager
def named_options():
    """The engine's errors name request fields; a person at the terminal needs the option to change."""
    try:
        yield
    except SlapgenError as error:
        raise GenerateError(in_option_terms(str(error), getattr(error, "field", None))) from None


def in_option_terms(sentence: str, field: str | None) -> str:
    """An engine sentence as the command line says it: the request fields it names (`condition_image`) as their
    options (`--condition-image`), led by the option to change when the sentence does not name it."""
    for name, option in OPTION_OF_FIELD.items():
        if "_" in name:  # a field's own spelling; plain words such as "prompt" or "adapter" stay words
            # ... standing alone: inside a name or a path (adapter `ticft-num_frames`, `runs/num_frames`) it stays
            sentence = re.sub(rf"(?<![\w./-]){name}(?![\w/-])", option, sentence)
    option = OPTION_OF_FIELD.get(field or "")
    return f"{option}: {sentence}" if option and option not in sentence else sentence


def check_options(options: GenerateOptions) -> str:
    """What needs no model nor torch: the mp4's name, the seed, the prompt (returned, rendered from its template)
    and that the files named exist. `slapgen generate` runs it before its imports, and again in the run."""
    if options.out.suffix.lower() != ".mp4":
        raise GenerateError(f"--out {options.out}: the video is written as mp4; name it e.g. slap.mp4")
    if options.out.is_dir():
        raise GenerateError(f"--out {options.out} is a folder; give the mp4's file name")
    if not 0 <= options.seed < 2**63:
        raise GenerateError("--seed must be between 0 and 2^63-1")
    prompt = render_prompt(options)
    for option, path in (("--adapter", options.adapter), ("--condition-image", options.condition_image)):
        if path is not None and not path.exists():
            raise GenerateError(f"{option} {path}: no such file or folder{closest_path_hint(path)}")
    if options.condition_image is not None and not options.condition_image.is_file():
        raise GenerateError(f"--condition-image {options.condition_image} is not a file (a PNG or JPEG image)")
    return prompt


def generate_video(options: GenerateOptions, progress: bool = True) -> dict:
    """Make the video; returns what was made (path, frames, seconds, the settings used)."""
    import torch
    from trainer.progress import progress_bar

    from slapgen.engine.conditioning import check_condition, check_frames
    from slapgen.engine.generator import VideoGenerator
    from slapgen.engine.params import EngineOptions
    from slapgen.images import read_image
    from slapgen.models.loading import resolve_model
    from slapgen.video import write_mp4_atomic
    from trainer.evaluate.options import MODEL_SETTING, AdapterArg, checked_params
    from trainer.evaluate.systems import check_base_models, resolve_systems, slot_shape, stage_adapters

    prompt = check_options(options)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerateError(f"--device {options.device} needs a CUDA GPU and none is usable here; use --device cpu")
    try:
        condition = read_image(options.condition_image) if options.condition_image is not None else None
    except ImageError as error:  # it named the file alone, not the option
        raise GenerateError(f"--condition-image {error}") from None
    given = (AdapterArg(adapter_name(options.adapter), options.adapter, typed=str(options.adapter)),) if options.adapter else ()
    systems = resolve_systems(given, include_base=False) if given else []
    adapter = systems[0].adapter if systems else None
    layout = systems[0].ticft_layout if systems else None  # from the LoRA's header, before any model loads
    resolved = resolve_model(options.model, options.model_cache_dir, setting=MODEL_SETTING)
    check_base_models(systems, resolved.spec.name)
    if layout is not None and isinstance(options.settings.get("num_frames"), int):
        with named_options():  # the layout's count first: the model's "must be 8k+1, got 5" sent users the wrong way
            check_frames(options.settings["num_frames"], layout)
    params = checked_params(resolved.spec, options.settings, "--set", prompt=prompt, seed=options.seed, adapter=adapter,
                            include_condition_frames=options.include_condition_frames)
    if layout is not None and "num_frames" not in options.settings:
        params = params.replace(num_frames=layout.pixel_frames)
    with named_options():  # the engine's own checks, before the (slow) model load
        check_condition(adapter, layout, condition is not None, options.include_condition_frames, "a PNG or JPEG file")
        if layout is not None:
            check_frames(params.num_frames, layout)
    params = params.replace(condition_image=condition)

    with tempfile.TemporaryDirectory(prefix="slapgen-generate-") as staged:
        adapters = Path(staged)
        stage_adapters(systems, adapters)
        rank, targets = slot_shape(systems)
        started = time.perf_counter()
        generator = VideoGenerator.load(resolved, EngineOptions(
            device=options.device, quantization=options.quantization, adapters_dir=adapters, max_lora_rank=rank,
            lora_target_modules=targets))
        loaded = time.perf_counter() - started
        bar = progress_bar(total=params.num_inference_steps, desc="generate", unit="step", disable=not progress)

        def on_step(done: int, total: int) -> None:
            bar.update(done - bar.n)

        started = time.perf_counter()
        try:
            with named_options():
                frames = generator.generate_frames(params, on_step)
        finally:
            bar.close()
        seconds = time.perf_counter() - started
    write_mp4_atomic(np.asarray(frames), options.out, params.fps)
    return {"path": options.out, "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
            "width": int(frames.shape[2]), "fps": params.fps, "seed": params.seed, "prompt": prompt,
            "ticft_layout": str(layout) if layout else None, "load_seconds": loaded, "generate_seconds": seconds}
