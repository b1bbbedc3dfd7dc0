"""The systems `slapgen eval` compares: `base` (no adapter) and each adapter given as NAME=PATH.

An adapter path is a LoRA file, or a folder holding `pytorch_lora_weights.safetensors` (a finished
run folder, a checkpoint folder, a diffusers LoRA folder). The engine serves adapters by name from
one folder, so each is linked into OUT/adapters/NAME.safetensors (a symbolic link, no copy of the
weights); the slot is sized to the largest adapter's rank and its target modules. A TIC-FT adapter's
layout is read from the same header, so its held-out clips can be cached before the model loads (the
engine checks the layout against the model again when it serves the adapter).

With `--checkpoints` a run folder is one system per saved step (`checkpoints.run_candidates`): named
NAME@STEP, linked as OUT/adapters/NAME--STEP.safetensors (the store's names have no `@`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from slapgen.atomic import staging_path
from slapgen.errors import TicftLayoutError, closest_path_hint, first_names
from slapgen.models import lora_format
from slapgen.models.lora_format import KEY_PATTERN, WEIGHTS_FILE, HeaderError, read_file_header
from slapgen.models.ticft import TicftLayout
from trainer.errors import EvalError
from trainer.evaluate.checkpoints import Candidate, slot_name, system_name
from trainer.evaluate.options import BASE, AdapterArg


@dataclass(frozen=True)
class System:
    name: str
    weights: Path | None  # None: the base model
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    ticft_layout: TicftLayout | None = None  # a TIC-FT adapter's layout (its `slapgen.ticft_layout` metadata)
    slot_name: str | None = None  # its name in the engine's adapter store when `name` is not one (NAME@STEP)
    base_model: str | None = None  # the model its metadata says it was trained on (`slapgen.base_model`)
    trigger_word: str | None = None  # the trigger word it was trained with (`slapgen.trigger_word`)

    @property
    def adapter(self) -> str | None:
        return None if self.weights is None else self.slot_name or self.name


def resolve_systems(adapters: tuple[AdapterArg, ...], include_base: bool = True,
                    checkpoints: Mapping[str, Sequence[Candidate]] | None = None) -> list[System]:
    """`base` (unless `include_base` is False: a sweep evaluates it once, not with every run), then each adapter;
    an adapter named in `checkpoints` (its run's candidates, `checkpoints.run_candidates`) as one system per step."""
    names = [adapter.name for adapter in adapters]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise EvalError(f"--adapter names must differ; {repeated[0]} is given twice")
    if not include_base and not adapters:
        raise EvalError("nothing to evaluate: no adapter and the base model left out")
    systems = [System(BASE, None)] if include_base else []
    for adapter in adapters:
        if checkpoints and adapter.name in checkpoints:
            systems += [replace(_system(AdapterArg(system_name(adapter.name, c.step), c.weights)),
                                slot_name=slot_name(adapter.name, c.step)) for c in checkpoints[adapter.name]]
        else:
            systems.append(_system(adapter))
    return systems


def _what_to_pass(folder: Path) -> str:
    """For a folder without a LoRA of its own: the runs it holds, or an unfinished run's checkpoints, by name (the
    advice to pass a checkpoint, given for any folder, sent a walk-through to look for checkpoints in `runs/`)."""
    runs = sorted(str(found.parent) for found in folder.glob(f"*/{WEIGHTS_FILE}"))
    if runs:
        return f"a folder of runs? pass one of them: {first_names(runs)}"
    checkpoints = sorted(found.parent for found in folder.glob(f"checkpoints/checkpoint-*/{WEIGHTS_FILE}"))
    if checkpoints:
        return f"an unfinished run? pass one of its checkpoints, such as {checkpoints[-1]}"
    return f"pass a training run's folder, or a LoRA file such as {WEIGHTS_FILE}"


def _community_hint(shapes: Mapping[str, list[int]]) -> str:
    """For a LoRA file in a community layout (a Wan LoRA of musubi-tuner's): what it is and how to get diffusers'
    layout, which this command reads (it said only "holds no transformer LoRA weights", of a file full of them)."""
    from slapgen.models.family import community_layout_of

    if (found := community_layout_of(shapes)) is None:
        return ""
    family, layout = found
    return (f" in diffusers' layout: it is a {family.name} LoRA in the {layout} layout, which slapgen converts "
            "on upload; upload it once to a service of the model (POST /adapters/upload) and pass the file it "
            "stores, SLAP_ADAPTERS_DIR/NAME.safetensors")


def _system(adapter: AdapterArg) -> System:
    path = adapter.path
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise EvalError(f"--adapter {adapter.given}: the folder has no {WEIGHTS_FILE} ({_what_to_pass(path)})")
        path = path / WEIGHTS_FILE
    elif not path.is_file():
        raise EvalError(f"--adapter {adapter.given}: no such file or folder{closest_path_hint(path)}")
    try:
        header = read_file_header(path)
    except HeaderError as error:
        raise EvalError(f"--adapter {adapter.given}: {path} is not a readable LoRA safetensors file ({error})") from None
    ranks, modules = [], set()
    for key, shape in header.shapes.items():
        match = KEY_PATTERN.match(key)
        if match and match["part"] == "A" and len(shape) == 2:
            ranks.append(shape[0])
            modules.add(_target_name(match["module"]))
    if not ranks:
        raise EvalError(f"--adapter {adapter.given}: {path} holds no transformer LoRA weights"
                        f"{_community_hint(header.shapes)}")
    declared = header.metadata.get(lora_format.TARGET_MODULES_KEY)
    targets = tuple(declared.split(",")) if declared else tuple(sorted(modules))
    layout = None
    if lora_format.TICFT_LAYOUT_KEY in header.metadata:
        try:
            layout = TicftLayout.parse(header.metadata[lora_format.TICFT_LAYOUT_KEY])
        except TicftLayoutError as error:
            raise EvalError(f"--adapter {adapter.given}: {path}: metadata {lora_format.TICFT_LAYOUT_KEY}: {error}") from None
    return System(adapter.name, path.resolve(), max(ranks), targets, layout,
                  base_model=header.metadata.get(lora_format.BASE_MODEL_KEY),
                  trigger_word=header.metadata.get(lora_format.TRIGGER_WORD_KEY) or None)


def check_base_models(systems: list[System], model_name: str) -> None:
    """Every adapter was trained on `model_name` (the engine's rule, `check_base_model`), checked before the
    held-out clips are encoded and the pipeline loads, not when the adapter is first swapped in."""
    from slapgen.engine.adapters import check_base_model

    for system in systems:
        check_base_model(system.name, system.base_model, model_name)


def trigger_word_of(systems: list[System], given: str | None) -> str | None:
    """The trigger word the held-out captions get: `--trigger-word` when given; else the one the adapters were
    trained with (`slapgen.trigger_word`), said in one line, so a forgotten option does not measure them on
    captions without the word they learnt; adapters trained with different words are one sentence."""
    if given is not None:
        return given
    words = {system.name: system.trigger_word for system in systems if system.trigger_word}
    if len(set(words.values())) > 1:
        said = ", ".join(f"{name}: {word!r}" for name, word in words.items())
        raise EvalError(f"the adapters were trained with different trigger words ({said}): evaluate them apart, or "
                        "give the held-out captions one with --trigger-word")
    if not words:
        return None
    word = next(iter(words.values()))
    print(f"eval: {', '.join(words)} trained with trigger word {word!r}: it goes into every held-out caption as "
          "training put it into its captions (--trigger-word to choose another)")
    return word


def _target_name(module: str) -> str:
    """`transformer_blocks.3.attn1.to_q` -> `to_q`; `....to_out.0` -> `to_out.0` (peft's target name)."""
    return "to_out.0" if module.endswith(".to_out.0") else module.rsplit(".", 1)[-1]


def stage_adapters(systems: list[System], folder: Path) -> None:
    """OUT/adapters/NAME.safetensors -> each adapter's weights, replacing links of an earlier run."""
    folder.mkdir(parents=True, exist_ok=True)
    for system in systems:
        if system.weights is None:
            continue
        link = folder / f"{system.adapter}.safetensors"
        staging = staging_path(link)
        os.symlink(system.weights, staging)
        os.replace(staging, link)  # atomic, like every other write


def slot_shape(systems: list[System]) -> tuple[int, tuple[str, ...] | None]:
    """The LoRA slot's rank and target modules: enough for every adapter (rank 1 with none; target modules
    None with none, which the engine reads as the model family's)."""
    rank = max([system.rank for system in systems] + [1])
    modules = sorted({module for system in systems for module in system.target_modules})
    return rank, tuple(modules) or None
