"""Training on the tiny model, on CPU, through the real loop (and the real CLI where it matters)."""

from __future__ import annotations

import json
import shutil
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel, WanPipeline
from safetensors.torch import load_file, save_file

from slapgen.models.cogvideox import draw_noise, latent_frames, rotary_embeddings, training_step
from slapgen.models.loading import resolve_model
from tests.conftest import REPO_ROOT, cli_stderr, free_port, offline_env, preset_overrides, tiny_train_overrides
from trainer.batches import BatchOrder, load_batch
from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.datasets import read_dataset
from trainer.errors import TrainError
from trainer.latent_cache import LAST_REPORT, LatentCache
from trainer.lora import LORA_FILENAME, add_lora, load_lora_into, read_lora_metadata
from trainer.train import setup, train


def _config(tiny_cache_dir, *extra):
    return load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, *extra))


# The model families a test runs on, by their tiny twins: `tiny` (CogVideoX) and `tiny-wan` (Wan 2.1).
MODELS = ["tiny", "tiny-wan"]


def _on_model(model: str, request, tmp_path) -> list[str]:
    """The settings that put a test on `model`: none for tiny (the CogVideoX tests exactly as they were);
    tiny-wan (materialised by its session fixture) on 2 clips of 5 frames (4k+1) with one latent cache for
    every run of the test, since the tiny Wan VAE's encode is most of a short run's cost on a CPU."""
    if model == "tiny":
        return []
    request.getfixturevalue("tiny_wan_cache_dir")
    return [f"model={model}", "data.num_frames=5", "data.max_clips=2", f"latent_cache={tmp_path / 'latents'}"]


def _fixed_loss(transformer, tiny_cache_dir, cache_root, clips, config) -> float:
    """Loss at fixed timesteps and noise, so before/after compare the model and nothing else."""
    resolved = resolve_model("tiny", tiny_cache_dir)
    entries = LatentCache(cache_root, resolved, config.data).precompute(clips, progress=False).entries
    batch = load_batch(entries, [0], "cpu")
    scheduler = CogVideoXDPMScheduler.from_pretrained(resolved.folder, subfolder="scheduler")
    rotary = rotary_embeddings(transformer.config, 64, 96, 3, "cpu")
    losses = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [50, 200, 400, 600, 800, 950] * 3:
            draws = draw_noise(batch, 1000, generator, timesteps=torch.tensor([t]))
            losses.append(training_step(transformer, scheduler, batch, draws, rotary, torch.float32).item())
    return float(np.mean(losses))


def test_overfitting_one_clip_lowers_the_loss(tiny_cache_dir, demo_dataset, tmp_path):
    config = _config(tiny_cache_dir, "data.max_clips=1", "train.max_train_steps=40", "optim.learning_rate=1e-2",
                     "lora.rank=8", "lora.alpha=8", "checkpoint.every_steps=100")
    adapter = train(config, demo_dataset, tmp_path / "run", progress=False)
    clips = read_dataset(demo_dataset)[:1]
    resolved = resolve_model("tiny", tiny_cache_dir)
    model = CogVideoXTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer")
    before = _fixed_loss(model, tiny_cache_dir, tmp_path / "run" / "cache", clips, config)
    add_lora(model, config.lora)
    load_lora_into(model, adapter)
    after = _fixed_loss(model, tiny_cache_dir, tmp_path / "run" / "cache", clips, config)
    assert after < 0.8 * before, (before, after)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "step_time_s", "peak_memory_mb"} <= set(logged[0])


def test_caption_dropout_trains_the_dropped_samples_on_the_empty_caption(tiny_cache_dir, demo_dataset, tmp_path,
                                                                         monkeypatch):
    """Guards `train.caption_dropout` (a new user's walk-through: every other video trainer has it): the samples
    a Bernoulli(share) draw picks train on the empty caption's embedding, as diffusers' own CogVideoXPipeline
    encodes "" (the unconditional branch classifier-free guidance uses), and the others on their own clip's
    caption, each as diffusers encodes it. The draw is the documented one (seeded from a digest of seed,
    micro-step and process), about `share` of the samples over the run; the noise draws are the run's without
    dropout (the dropout has a generator of its own)."""
    import hashlib

    import trainer.train as train_module

    share, steps, batch = 0.5, 6, 2
    seen = []
    real_step = train_module.training_step

    def spying_step(transformer, scheduler, batch_, draws, transformer_inputs, dtype, frame_plan=None):
        seen.append((batch_.prompt_embeds.clone(), draws.timesteps.clone()))
        return real_step(transformer, scheduler, batch_, draws, transformer_inputs, dtype, frame_plan=frame_plan)

    monkeypatch.setattr(train_module, "training_step", spying_step)
    settings = [f"train.max_train_steps={steps}", f"train.batch_size={batch}", "checkpoint.every_steps=100"]
    train(_config(tiny_cache_dir, *settings, f"train.caption_dropout={share}"), demo_dataset, tmp_path / "dropout",
          progress=False)
    dropped_run, seen = seen, []
    train(_config(tiny_cache_dir, *settings), demo_dataset, tmp_path / "plain", progress=False)

    resolved = resolve_model("tiny", tiny_cache_dir)
    pipeline = CogVideoXPipeline.from_pretrained(resolved.folder)

    def embedding(text: str) -> torch.Tensor:
        return pipeline.encode_prompt(text, do_classifier_free_guidance=False, device="cpu",
                                      max_sequence_length=resolved.spec.max_sequence_length)[0][0]

    empty = embedding("")
    captions = [embedding(clip.caption) for clip in read_dataset(demo_dataset)]
    seed = _config(tiny_cache_dir).train.seed
    picked = []
    for micro_step, ((embeds, timesteps), (_, plain_timesteps)) in enumerate(zip(dropped_run, seen, strict=True)):
        digest = hashlib.sha256(f"caption dropout {seed} {micro_step} 0".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        expected = (torch.rand(batch, generator=generator) < share).tolist()
        assert torch.equal(timesteps, plain_timesteps)  # the run's noise draws are not moved by the dropout's
        for sample, dropped in zip(embeds, expected, strict=True):
            if dropped:
                assert torch.allclose(sample, empty, atol=1e-5)
            else:
                assert any(torch.allclose(sample, caption, atol=1e-5) for caption in captions)
                assert not torch.allclose(sample, empty, atol=1e-5)
        picked += expected
    assert 0 < sum(picked) < len(picked) == steps * batch  # some dropped, some kept (6 of 12 here)


def test_wan_trains_on_the_sigmas_its_flow_matching_section_draws(tiny_cache_dir, demo_dataset, tmp_path,
                                                                  monkeypatch, request):
    """Guards `flow_matching` (a new user's walk-through: no choice of Wan's timestep sampling; musubi-tuner trains
    Wan with shift 3): the noise levels the transformer sees at each step are the config's draw, replayed here from
    the run's documented generator (seed x 1_000_003 + process) in the family's draw order (posterior, noise, then
    u ~ U(0, 1)) and shifted by the formula shift u / (1 + (shift - 1) u), times 1000. Without the section the
    levels are TIC-FT's logit-normal ones, as before. On CogVideoX (v-prediction, integer timesteps) the section is
    refused in one sentence."""
    import trainer.train as train_module

    seen = []
    real_step = train_module.training_step

    def spying_step(transformer, scheduler, batch, draws, transformer_inputs, dtype, frame_plan=None):
        seen.append((batch.latent_mean.shape, draws.timesteps.clone()))
        return real_step(transformer, scheduler, batch, draws, transformer_inputs, dtype, frame_plan=frame_plan)

    monkeypatch.setattr(train_module, "training_step", spying_step)
    settings = ["train.max_train_steps=3", "train.batch_size=2", "checkpoint.every_steps=100",
                *_on_model("tiny-wan", request, tmp_path)]
    config = _config(tiny_cache_dir, *settings, "flow_matching.sigma_sampling=uniform", "flow_matching.shift=3")
    train(config, demo_dataset, tmp_path / "shifted", progress=False)
    generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + 0)
    for shape, timesteps in seen:
        torch.randn(shape, generator=generator)  # the posterior draw
        torch.randn(shape, generator=generator)  # the diffusion noise
        u = torch.rand((shape[0],), generator=generator)
        torch.testing.assert_close(timesteps, 1000 * (3 * u / (1 + 2 * u)))
    assert len(seen) == 3

    seen.clear()
    train(_config(tiny_cache_dir, *settings), demo_dataset, tmp_path / "default", progress=False)
    generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + 0)
    for shape, timesteps in seen:
        torch.randn(shape, generator=generator)
        torch.randn(shape, generator=generator)
        u = torch.sigmoid(torch.normal(0.0, 1.0, (shape[0],), generator=generator))
        torch.testing.assert_close(timesteps, 1000 * u)

    from trainer.errors import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"flow_matching sets how a flow-matching model \(Wan\) draws its noise "
                                         r"levels; tiny is a cogvideox model, which trains on x0 from v-prediction"):
        _config(tiny_cache_dir, "flow_matching.shift=3")


@pytest.mark.parametrize("model", MODELS)
def test_resume_continues_exactly(model, tiny_cache_dir, demo_dataset, tmp_path, request):
    """Guards resume (LoRA, optimizer, schedule, data position, the captions dropped and every random state
    restored) on each family: stopped at step 3 and resumed, the LoRA is bit-identical to an uninterrupted run's (on
    tiny-wan: flow matching's logit-normal sigma draws come from the same restored generator)."""
    settings = ["train.max_train_steps=6", "checkpoint.every_steps=3", "optim.lr_scheduler=cosine_with_restarts",
                "optim.lr_warmup_steps=2", "train.gradient_accumulation_steps=2", "train.caption_dropout=0.5",
                *_on_model(model, request, tmp_path)]
    straight = train(_config(tiny_cache_dir, *settings), demo_dataset, tmp_path / "straight", progress=False)
    interrupted = tmp_path / "interrupted"
    assert train(_config(tiny_cache_dir, *settings), demo_dataset, interrupted, stop_at_step=3, progress=False) is None
    assert not (interrupted / LORA_FILENAME).exists()
    resumed = train(_config(tiny_cache_dir, *settings), demo_dataset, interrupted, resume="latest", progress=False)
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_skips_corrupt_checkpoints_for_the_newest_intact_one(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards a corrupt latest checkpoint (its state file present, optimizer.pt cut short) blocking
    `--resume latest` with a raw traceback: resume falls back to the newest checkpoint that reads whole,
    says which one it skipped and why, and still continues bit-exactly; with none intact, a TrainError
    in one line that names each one skipped."""
    settings = ["train.max_train_steps=6", "checkpoint.every_steps=2"]
    straight = train(_config(tiny_cache_dir, *settings), demo_dataset, tmp_path / "straight", progress=False)
    run = tmp_path / "run"
    train(_config(tiny_cache_dir, *settings), demo_dataset, run, stop_at_step=4, progress=False)
    optimizer = run / "checkpoints" / "checkpoint-000004" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    lora = run / "checkpoints" / "checkpoint-000002" / LORA_FILENAME
    intact = lora.read_bytes()
    lora.write_bytes(b"garbage")
    with pytest.raises(TrainError) as none_intact:
        train(_config(tiny_cache_dir, *settings), demo_dataset, run, resume="latest", progress=False)
    message = str(none_intact.value)
    assert "no intact checkpoint" in message and "\n" not in message
    assert "checkpoint-000004: optimizer.pt unreadable" in message
    assert f"checkpoint-000002: {LORA_FILENAME} unreadable" in message

    lora.write_bytes(intact)
    capsys.readouterr()
    resumed = train(_config(tiny_cache_dir, *settings), demo_dataset, run, resume="latest", progress=False)
    out = capsys.readouterr().out
    assert "skipping checkpoint-000004: optimizer.pt unreadable" in out and "checkpoint-000002 at step 2" in out
    a, b = load_file(straight), load_file(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_that_reads_but_holds_the_wrong_things_is_skipped(tiny_cache_dir, demo_dataset, tmp_path,
                                                                          capsys):
    """Guards checkpoint files that read whole but hold something else: a LoRA missing half its tensors resumed
    without a word (those left as initialised, the final LoRA off in every tensor), a LoRA of another rank, an
    empty dict for optimizer.pt or the RNG state stopped on a KeyError traceback, and a state file whose step is
    not its folder's resumed at that step with the folder's weights. Each is skipped, saying why, for the one
    before."""
    settings = ["train.max_train_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=2"]
    run = tmp_path / "run"
    train(_config(tiny_cache_dir, *settings), demo_dataset, run, stop_at_step=2, progress=False)
    latest = run / "checkpoints" / "checkpoint-000002"
    whole = {path.name: path.read_bytes() for path in latest.iterdir()}
    lora = load_file(latest / LORA_FILENAME)
    half = dict(sorted(lora.items())[: len(lora) // 2])
    key = sorted(lora)[0]
    wider = {**lora, key: torch.zeros(lora[key].shape[0] * 2, *lora[key].shape[1:])}
    cases = {
        LORA_FILENAME: (lambda path: save_file(half, str(path)),
                        f"{LORA_FILENAME} is not this run's LoRA ({len(lora) - len(half)} of its tensors missing, e.g. "),
        "optimizer.pt": (lambda path: torch.save({}, path), "optimizer.pt holds no state, param_groups"),
        "rng-0.pt": (lambda path: torch.save({}, path), "rng-0.pt holds no torch, noise"),
        "trainer_state.json": (lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), "step": 1})),
                               "trainer_state.json says step 1, its folder 2"),
    }
    for name, (damage, reason) in [*cases.items(), ("wider", (lambda path: save_file(wider, str(path)),
                                                             f"{LORA_FILENAME} is not this run's LoRA ({key} is "))]:
        damage(latest / (LORA_FILENAME if name == "wider" else name))
        capsys.readouterr()
        train(_config(tiny_cache_dir, *settings), demo_dataset, run, resume="latest", stop_at_step=2, progress=False)
        out = capsys.readouterr().out
        assert f"skipping checkpoint-000002: {reason}" in out and "checkpoint-000001 at step 1" in out, (name, out)
        for file, data in whole.items():  # the next case starts from the checkpoint as it was
            (latest / file).write_bytes(data)


def _full_disk(monkeypatch, failing, code: int) -> None:
    """Writes for which `failing(path)` holds put a few bytes down, then fail as a full disk (or quota)
    does: an OSError with its errno, from the file object torch.save writes to or from Path.write_bytes."""
    import os
    import pathlib

    import safetensors.torch
    from safetensors import SafetensorError

    import trainer.lora

    real_save, real_write_bytes, real_save_file = torch.save, pathlib.Path.write_bytes, safetensors.torch.save_file

    def full(handle):
        handle.write(b"x" * 100)
        raise OSError(code, os.strerror(code))

    def save(obj, target, *args, **kwargs):
        if not failing(Path(target.name if hasattr(target, "write") else target)):
            return real_save(obj, target, *args, **kwargs)
        if hasattr(target, "write"):
            full(target)
        with open(target, "wb") as handle:
            full(handle)

    def write_bytes(self, data):
        if not failing(self):
            return real_write_bytes(self, data)
        with open(self, "wb") as handle:
            full(handle)

    def save_file(tensors, filename, metadata=None):  # as safetensors' own writer fails on a 64 KiB tmpfs
        if failing(Path(filename)):
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    monkeypatch.setattr(trainer.lora, "save_file", save_file, raising=False)  # if the LoRA is written by safetensors


FULL_DISK_SETTINGS = ("train.max_train_steps=4", "checkpoint.every_steps=2")


@pytest.fixture(scope="module")
def full_disk_straight(tiny_cache_dir, demo_dataset, tmp_path_factory) -> Path:
    """The LoRA of the full-disk cases' run trained without a failure. Shared by both cases: each only reads it
    (the run it is compared with is the case's own), and it is trained before either case fakes a full disk."""
    return train(_config(tiny_cache_dir, *FULL_DISK_SETTINGS), demo_dataset, tmp_path_factory.mktemp("full-disk-straight"),
                 progress=False)


@pytest.mark.slow  # two short trainings per case, and the module's run without a failure
@pytest.mark.parametrize("case", ["checkpoint", "lora"])
def test_a_full_disk_while_saving_stops_with_one_line_and_keeps_the_last_checkpoint(
        tiny_cache_dir, demo_dataset, full_disk_straight, tmp_path, monkeypatch, capsys, case):
    """Guards `slapgen train` ending in a traceback (torch's "unexpected pos", safetensors' or Python's
    OSError) when the disk fills up or a quota is reached while it saves: one line naming what could not
    be saved and how to continue, exit 2, no half-written checkpoint left behind, the previous
    checkpoint whole: resuming from it ends bit-exactly where a run that never failed ends."""
    import errno

    from trainer.checkpoints import list_checkpoints

    settings = FULL_DISK_SETTINGS
    straight = full_disk_straight
    run = tmp_path / "run"
    if case == "checkpoint":  # optimizer.pt of the second checkpoint hits ENOSPC
        _full_disk(monkeypatch, lambda path: path.parent.name == "checkpoint-000004" and "optimizer" in path.name,
                   errno.ENOSPC)
        expected, last, strerror = "cannot save checkpoint-000004", "checkpoint-000002", "No space left on device"
    else:  # the final LoRA hits the quota
        _full_disk(monkeypatch, lambda path: path.parent == run and LORA_FILENAME in path.name, errno.EDQUOT)
        expected, last, strerror = "cannot save the LoRA", "checkpoint-000004", "Disk quota exceeded"
    capsys.readouterr()
    code = cli_main(["train", "--config", "tiny-smoke", "--data", str(demo_dataset), "--out", str(run),
                     *sum((["--set", o] for o in tiny_train_overrides(tiny_cache_dir, *settings)), [])])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    lines = [line for line in re.split(r"[\r\n]", cli_stderr(err)) if line.startswith("slapgen")]  # between progress bars
    fix = "free some space" if case == "checkpoint" else "raise the quota"
    assert lines == [f"slapgen train: {expected} in {run}: {strerror}; {fix}, "
                     f"then continue with --resume latest (from {last})"], err[-3000:]
    kept = ["checkpoint-000002", "checkpoint-000004"][:2 if case == "lora" else 1]
    assert [p.name for p in list_checkpoints(run)] == kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept  # a half-made one is gone
    assert not [p for p in run.rglob(".*.tmp")] and not (run / LORA_FILENAME).exists()

    monkeypatch.undo()
    resumed = train(_config(tiny_cache_dir, *settings), demo_dataset, run, resume="latest", progress=False)
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards the refusal of a resume with another config saying only `the config differs`: a new user who
    resumed a finished run with a longer train.max_train_steps could not tell which keys differed, nor that
    training further is a new run. The one line names each differing key with both values, says that resume
    continues the run's own schedule, and what to do instead; the run's config.yaml is left as it was."""
    run = tmp_path / "run"
    train(_config(tiny_cache_dir, "train.max_train_steps=4"), demo_dataset, run, stop_at_step=2, progress=False)
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    code = cli_main(["train", "--config", "tiny-smoke", "--data", str(demo_dataset), "--out", str(run), "--resume", "latest",
                     *sum((["--set", o] for o in tiny_train_overrides(tiny_cache_dir, "train.max_train_steps=20",
                                                                     "lora.rank=8")), [])])
    assert code == 2
    error = cli_stderr(capsys.readouterr().err)
    assert "\n" not in error
    assert error.startswith(f"slapgen train: the config differs from the run's {run / 'config.yaml'} "
                            "(lora.rank: 4 in the run, 8 now; train.max_train_steps: 4 in the run, 20 now): ")
    assert "--resume continues that run with its own config and schedule" in error
    assert "to train further, start a new run with another --out" in error
    assert (run / "config.yaml").read_text() == saved


def test_config_differences_name_dotted_keys_with_both_values():
    """Guards the differences a refused resume names (see above): dotted keys in the config's order, values as
    JSON (a string stays quoted, null is null), a key only one side has said to be unset there, a section null
    on one side one difference."""
    from trainer.run_folder import config_differences

    saved = "model: tiny\ntrain: {max_train_steps: 10, seed: 42}\nlora: {target_modules: null, rank: 4}\nticft: null\n"
    now = ("model: '7'\ntrain: {max_train_steps: 20, seed: 42}\nlora: {target_modules: [to_q], rank: 4, dropout: 0.1}\n"
           "ticft: {layout: c1b3t9}\n")
    assert config_differences(saved, now) == [
        'model: "tiny" in the run, "7" now',
        "train.max_train_steps: 10 in the run, 20 now",
        'lora.target_modules: null in the run, ["to_q"] now',
        "lora.dropout: unset in the run, 0.1 now",
        'ticft: null in the run, {"layout": "c1b3t9"} now',
    ]
    assert config_differences(saved, saved.replace("{max_train_steps: 10, seed: 42}", "{seed: 42, max_train_steps: 10}")) == []


def test_checkpoints_rotate_and_hold_a_loadable_lora(tiny_cache_dir, demo_dataset, tmp_path):
    run = tmp_path / "run"
    train(_config(tiny_cache_dir, "train.max_train_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=2"),
          demo_dataset, run, progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-000004", "checkpoint-000006"]
    metadata = read_lora_metadata(run / "checkpoints" / "checkpoint-000004" / LORA_FILENAME)
    assert metadata["slapgen.steps"] == "4"


# Each family's plain diffusers pipeline, and where its first block's self-attention query is.
PIPELINES = {"tiny": (CogVideoXPipeline, lambda transformer: transformer.transformer_blocks[0].attn1.to_q),
             "tiny-wan": (WanPipeline, lambda transformer: transformer.blocks[0].attn1.to_q)}


@pytest.mark.parametrize("model", MODELS)
def test_saved_lora_loads_in_diffusers_and_changes_the_output(model, tiny_cache_dir, demo_dataset, tmp_path, request):
    """Guards the trained LoRA's format on each family (keys, rank, alpha/rank scaling, metadata) and the
    validation videos written during training: the family's plain diffusers pipeline (CogVideoXPipeline,
    WanPipeline) loads it with `load_lora_weights` at the trained scaling, and it changes the frames."""
    config = _config(tiny_cache_dir, "train.max_train_steps=8", "lora.rank=8", "lora.alpha=4",
                     "validation.prompts=[a power slap]", "validation.every_steps=4", "validation.num_inference_steps=2",
                     *_on_model(model, request, tmp_path))
    adapter = train(config, demo_dataset, tmp_path / "run", progress=False)

    metadata = read_lora_metadata(adapter)
    assert metadata["slapgen.base_model"] == model
    assert (metadata["slapgen.rank"], metadata["slapgen.alpha"], metadata["slapgen.steps"]) == ("8", "4.0", "8")
    assert metadata["slapgen.target_modules"] == "to_q,to_k,to_v,to_out.0"
    assert json.loads(metadata["slapgen.config"])["lora"]["rank"] == 8
    for step in (4, 8):
        assert (tmp_path / "run" / "validation" / f"step-{step:06d}" / "prompt-00.mp4").stat().st_size > 0

    resolved = resolve_model(model, tiny_cache_dir)
    pipeline_class, first_query = PIPELINES[model]

    def generate(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        return pipeline("a power slap", num_frames=9, height=64, width=96, num_inference_steps=2, max_sequence_length=32,
                        generator=torch.Generator("cpu").manual_seed(3), output_type="np").frames[0]

    base = generate(pipeline_class.from_pretrained(resolved.folder, dtype=torch.float32))
    pipeline = pipeline_class.from_pretrained(resolved.folder, dtype=torch.float32)
    pipeline.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="slap")
    layer = first_query(pipeline.transformer)
    assert layer.r["slap"] == 8 and layer.scaling["slap"] == pytest.approx(0.5)  # alpha / rank survived
    assert not np.allclose(base, generate(pipeline), atol=1e-4)


def test_cli_quick_start_and_bad_input(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    data = tmp_path / "demo"
    assert cli_main(["demo-data", str(data), "--clips", "2"]) == 0
    assert sorted(p.name for p in data.iterdir()) == ["clip_000.mp4", "clip_000.txt", "clip_001.mp4", "clip_001.txt"]
    capsys.readouterr()
    assert cli_main(["precompute", str(data), "--model", "tiny", "--out", str(tmp_path / "cache"),
                     "--config", "tiny-smoke", "--set", f"model_cache_dir={tiny_cache_dir}"]) == 0
    printed = capsys.readouterr()
    assert "2 clips ready (2 encoded" in printed.err and json.loads(printed.out) == []  # no clip skipped

    (data / "clip_001.txt").write_text("  \n")
    assert cli_main(["train", "--config", "tiny-smoke", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    error = cli_stderr(capsys.readouterr().err)
    assert error.startswith("slapgen train:") and "clip_001.mp4 has an empty caption" in error and "\n" not in error
    assert cli_main(["train", "--config", "tiny-smoke", "--data", str(data), "--out", str(tmp_path / "run"), "--set", "lora.rnk=2"]) == 2
    assert "lora.rnk" in capsys.readouterr().err
    assert cli_main(["train", "--config", "nope", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    assert "presets: aggressive, conservative, ticft, tiny-smoke" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_adam8bit_on_cpu_is_a_clear_error(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    code = cli_main(["train", "--config", "tiny-smoke", "--data", str(demo_dataset), "--out", str(tmp_path / "run"),
                     *sum((["--set", o] for o in tiny_train_overrides(tiny_cache_dir, "optim.optimizer=adam8bit")), [])])
    assert code == 2 and "adam8bit needs a CUDA GPU" in capsys.readouterr().err


# --- numbers of the loop against references ---------------------------------------------------------

def test_training_rope_equals_the_pipelines_own_at_a_non_square_size(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards the RoPE the trainer builds (a height/width swap at the call site or in the helper, the
    crop region's base width and height swapped, the wrong latent frame count): at 48x96 (non-square,
    not the tiny model's 64x96 aspect, so the crop region matters) the run's rotary embeddings equal
    diffusers' CogVideoXPipeline._prepare_rotary_positional_embeddings for the same clip, and the
    swapped size gives different ones (so a swap cannot pass); the helper agrees at more sizes."""
    config = _config(tiny_cache_dir, "data.height=48", "data.width=96", "data.max_clips=1")
    run = setup(config, demo_dataset, tmp_path / "run", resume=None, progress=False, existing=None)
    pipeline = CogVideoXPipeline.from_pretrained(resolve_model("tiny", tiny_cache_dir).folder, dtype=torch.float32)
    frames = latent_frames(config.data.num_frames)
    expected = pipeline._prepare_rotary_positional_embeddings(48, 96, frames, torch.device("cpu"))
    assert len(run.rotary) == len(expected) == 2
    for ours, reference in zip(run.rotary, expected):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    swapped = pipeline._prepare_rotary_positional_embeddings(96, 48, frames, torch.device("cpu"))
    assert not torch.equal(swapped[0], expected[0])
    for height, width in [(64, 96), (96, 64), (32, 96), (64, 64)]:
        reference = pipeline._prepare_rotary_positional_embeddings(height, width, 3, torch.device("cpu"))
        ours = rotary_embeddings(pipeline.transformer.config, height, width, 3, "cpu")
        assert all(torch.equal(a, b) for a, b in zip(ours, reference)), (height, width)
        if height != width:
            swapped = rotary_embeddings(pipeline.transformer.config, width, height, 3, "cpu")
            assert not torch.equal(swapped[0], reference[0]), (height, width)


class GradientSpy:
    """Wraps trainer.train.make_optimizer: records, for every optimizer step, each trainable parameter's
    gradient as the sum of what every backward of that step contributed (a tensor hook sees each
    contribution before it is added to .grad, so clipping cannot touch it) and the gradient the
    optimizer then sees."""

    def __init__(self, monkeypatch):
        import trainer.train as train_module

        self.steps = []
        real = train_module.make_optimizer

        def make_optimizer(parameters, optim):
            parameters = list(parameters)
            optimizer = real(parameters, optim)
            contributions = {}

            def add(key, gradient):
                contributions[key] = contributions.get(key, 0) + gradient.detach().clone()

            for parameter in parameters:
                parameter.register_hook(lambda gradient, key=id(parameter): add(key, gradient))

            def before_step(*_):
                seen = [p.grad.detach().clone() for p in parameters]
                self.steps.append(([contributions[id(p)] for p in parameters], seen))
                contributions.clear()

            optimizer.register_step_pre_hook(before_step)
            return optimizer

        monkeypatch.setattr(train_module, "make_optimizer", make_optimizer)


@pytest.mark.parametrize("max_grad_norm, clipped", [(1e-4, True), (1e6, False)])
def test_the_optimizer_sees_the_gradient_clipped_to_max_grad_norm(tiny_cache_dir, demo_dataset, tmp_path, monkeypatch,
                                                                 max_grad_norm, clipped):
    """Guards gradient clipping (dropped, after the optimizer step, on other parameters, to another
    norm, on each micro-step's gradient instead of the accumulated one): with g_i the sum of every
    micro-step's backward for trainable parameter i and N = sqrt(sum ||g_i||^2), the optimizer sees
    g_i * max_norm / N when N > max_norm (torch's clip_grad_norm_, whose coefficient is
    max_norm / (N + 1e-6)) and g_i unchanged below it; its total norm is at most max_grad_norm; the
    logged grad_norm is N."""
    spy = GradientSpy(monkeypatch)
    config = _config(tiny_cache_dir, "train.max_train_steps=2", "train.gradient_accumulation_steps=2",
                     f"optim.max_grad_norm={max_grad_norm}", "optim.lr_warmup_steps=1", "checkpoint.every_steps=100",
                     "data.max_clips=2")
    train(config, demo_dataset, tmp_path / "run", progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(spy.steps) == len(logged) == 2
    for (unclipped, seen), row in zip(spy.steps, logged):
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in unclipped))
        assert row["grad_norm"] == pytest.approx(total, rel=1e-5)
        assert (total > max_grad_norm) is clipped
        factor = min(1.0, max_grad_norm / (total + 1e-6))
        for before, after in zip(unclipped, seen):
            torch.testing.assert_close(after, before * factor, rtol=1e-5, atol=1e-12)
        assert math.sqrt(sum(float(g.double().pow(2).sum()) for g in seen)) <= max_grad_norm * (1 + 1e-5)


def schedule_by_hand(step, base, warmup, total, cycles):
    """diffusers' cosine_with_restarts (get_cosine_with_hard_restarts_schedule_with_warmup) after `step`
    optimizer steps: linear warm-up over `warmup` steps, then `cycles` cosine decays to 0."""
    if step < warmup:
        return base * step / warmup
    progress = (step - warmup) / (total - warmup)
    if progress >= 1.0:
        return 0.0
    return base * 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))


LR_SCHEDULE_SETTINGS = ["train.max_train_steps=7", "train.gradient_accumulation_steps=2", "optim.learning_rate=1e-3",
                        "optim.lr_scheduler=cosine_with_restarts", "optim.lr_warmup_steps=3", "optim.lr_num_cycles=2",
                        "checkpoint.every_steps=100", "data.max_clips=2"]
# After optimizer step k (k = 1..7): 1/3, 2/3 of the peak in warm-up, then two cosine cycles.
LR_SCHEDULE = [schedule_by_hand(k, 1e-3, warmup=3, total=7, cycles=2) for k in range(1, 8)]


def logged_lr(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    return [row["lr"] for row in rows]


def test_logged_lr_follows_the_schedule_per_optimizer_step(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards the learning-rate schedule (warm-up length, total length, cycles; the schedule stepped per
    micro-step with gradient accumulation, or once per process too few/many): the lr logged at optimizer
    step k is the rate after k scheduler steps (get_last_lr() after stepping, as diffusers' training
    scripts log it), written out above: [1/3, 2/3, 1, 1/2, 1, 1/2, 0] x 1e-3 with 2 micro-steps each."""
    assert LR_SCHEDULE == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 5e-4, 1e-3, 5e-4, 0.0])
    train(_config(tiny_cache_dir, *LR_SCHEDULE_SETTINGS), demo_dataset, tmp_path / "run", progress=False)
    assert logged_lr(tmp_path / "run") == pytest.approx(LR_SCHEDULE, rel=1e-9, abs=1e-15)


def test_batch_order_is_a_pure_function_of_the_step():
    order = BatchOrder(num_items=5, batch_size=2, num_processes=2, process_index=1, seed=7)
    first = [order.indices(step) for step in range(6)]
    again = BatchOrder(5, 2, 2, 1, 7)
    assert [again.indices(step) for step in (5, 0, 3)] == [first[5], first[0], first[3]]
    other_process = BatchOrder(5, 2, 2, 0, 7)
    per_epoch = sorted(other_process.indices(0) + order.indices(0) + [other_process.indices(1)[0]])
    assert per_epoch == [0, 1, 2, 3, 4]  # the two processes split one epoch without overlap


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_accelerate_launch_two_cpu_processes(model, tiny_cache_dir, demo_dataset, tmp_path, request):
    """Two real processes (gloo), launched without --mixed_precision while the config asks for bf16 (the
    conservative preset): guards the trainer building a second Accelerator with another precision
    (`AcceleratorState has already been initialized`) and CPU processes that never join one group.
    accelerate 1.15's `launch --cpu --num_processes 2` starts only one process without mpirun, so CPU
    multi-process goes through the torchrun launcher with ACCELERATE_USE_CPU=1, as README.md documents.
    Also guards the latent cache encoded by the main process alone while the others waited (N-1 GPUs idle for the
    hours a few thousand clips take): each process encodes its share, and the cache keeps the report that adds the
    shares up (it kept the last whole-cache read's, 0 encoded). On tiny-wan too: DDP over Wan's transformer (a LoRA that leaves most modules frozen, flow matching's
    per-sample sigma) must reduce every LoRA gradient on every step."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--dynamo_backend", "no", "-m", "trainer", "train", "--config", "conservative",
               "--data", str(demo_dataset), "--out", str(run),
               *sum((["--set", o] for o in preset_overrides(tiny_cache_dir, "train.max_train_steps=4",
                                                            "checkpoint.every_steps=2", "validation.prompts=[]",
                                                            *_on_model(model, request, tmp_path))), [])]
    env = offline_env(tmp_path, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each process encodes its share (the main process's bar counts its half of the clips: it counted them all while
    # the other waited), and the run's line counts what all encoded.
    clips = 4 if model == "tiny" else 2  # tiny-wan: data.max_clips=2
    finals = [line for line in result.stderr.splitlines() if line.startswith("precompute:") and "100%" in line]
    assert len(finals) == 1 and f" {clips // 2}/{clips // 2} " in finals[0] and f"encoded={clips // 2}," in finals[0], finals
    assert f"data: {clips} clips ready ({clips} encoded, 0 reused); skipped: none" in result.stdout, result.stdout
    # ... and so does the cache's kept report (it was the last whole-cache read's: 0 encoded, all reused)
    kept = json.loads(next(tmp_path.rglob(LAST_REPORT)).read_text())
    assert (kept["ready"], kept["encoded"], kept["reused"]) == (clips, clips, 0), kept
    tensors = load_file(run / LORA_FILENAME)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    checkpoint = run / "checkpoints" / "checkpoint-000004"
    assert (checkpoint / "rng-0.pt").is_file() and (checkpoint / "rng-1.pt").is_file()  # both processes saved RNG
    assert json.loads((checkpoint / "trainer_state.json").read_text())["processes"] == 2
    assert read_lora_metadata(run / LORA_FILENAME)["slapgen.steps"] == "4"
    assert json.loads(read_lora_metadata(run / LORA_FILENAME)["slapgen.config"])["train"]["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_logged_lr_with_two_processes_is_the_one_process_schedule(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards the schedule under `accelerate launch --num_processes 2` (CPU, gloo): accelerate steps a
    prepared scheduler once per process per optimizer step, so warm-up and length must be counted in
    those steps (trainer.optim.make_lr_scheduler); otherwise warm-up ends at half the steps and the
    cosine runs twice as fast. The logged lr per optimizer step is the one-process schedule written out
    in `LR_SCHEDULE`. Launched as test_accelerate_launch_two_cpu_processes does."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--dynamo_backend", "no", "-m", "trainer", "train", "--config", "tiny-smoke",
               "--data", str(demo_dataset), "--out", str(run),
               *sum((["--set", o] for o in tiny_train_overrides(tiny_cache_dir, *LR_SCHEDULE_SETTINGS)), [])]
    env = offline_env(tmp_path, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "checkpoints" / "checkpoint-000007" / "trainer_state.json").read_text())["processes"] == 2
    assert logged_lr(run) == pytest.approx(LR_SCHEDULE, rel=1e-9, abs=1e-15)


def test_validation_videos_show_a_bar_of_their_denoising_steps(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards validation running with the pipeline's bar disabled and no word: on a real model one validation
    video takes minutes, and the training bar sat still at its step, unexplained. Each video now has a bar
    (denoising steps, ETA) named by step and video; a sweep's runs (progress=False) stay quiet."""
    config = load_config("tiny-smoke", tiny_train_overrides(
        tiny_cache_dir, "train.max_train_steps=4", "validation.every_steps=2", "validation.num_inference_steps=3",
        "validation.prompts=[a slap, a stagger]"))
    train(config, demo_dataset, tmp_path / "run", progress=True)
    shown = capsys.readouterr().err
    for step in (2, 4):
        for video in (1, 2):
            assert f"validation at step {step}, video {video}/2:" in shown
    assert re.search(r"validation at step 2, video 1/2: +\d+%\|[^|]*\| \d/3 \[", shown)
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == ["step-000002", "step-000004"]
    train(config, demo_dataset, tmp_path / "quiet", progress=False)
    assert "validation at step" not in capsys.readouterr().err


def test_the_last_step_is_validated_whatever_every_steps_divides(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards a run whose step count is not a multiple of `validation.every_steps` ending with no video of its
    final LoRA (a TIC-FT walk-through's finding: README's 4-step example with the default 500 wrote none): as
    finetrainers' and diffusers' scripts do, the last step is validated too, once."""
    config = load_config("tiny-smoke", tiny_train_overrides(
        tiny_cache_dir, "train.max_train_steps=3", "validation.every_steps=2", "validation.num_inference_steps=1",
        "validation.prompts=[a slap]"))
    train(config, demo_dataset, tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == ["step-000002", "step-000003"]
    assert (tmp_path / "run" / "validation" / "step-000003" / "prompt-00.mp4").stat().st_size > 0


def test_validation_videos_a_stop_cut_short_are_made_on_resume(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards a run killed during the validation of a step it had saved as a checkpoint (the final step here):
    the resume started after that step, said the run was complete, and its final LoRA's videos were never made.
    The state a kill leaves is made by removing that step's videos; the resume makes them, bit for bit the ones
    the uninterrupted run made, and only once."""
    config = load_config("tiny-smoke", tiny_train_overrides(
        tiny_cache_dir, "train.max_train_steps=2", "optim.lr_warmup_steps=1", "checkpoint.every_steps=1",
        "validation.every_steps=2", "validation.num_inference_steps=1", "validation.prompts=[a slap]"))
    run = tmp_path / "run"
    train(config, demo_dataset, run, progress=False)
    video = run / "validation" / "step-000002" / "prompt-00.mp4"
    made = video.read_bytes()
    shutil.rmtree(video.parent)
    capsys.readouterr()
    train(config, demo_dataset, run, resume="latest", progress=False)
    assert ("the validation videos of step 2 were not made (the run stopped before they were): making them"
            in capsys.readouterr().out)
    assert video.read_bytes() == made
    train(config, demo_dataset, run, resume="latest", progress=False)
    assert "were not made" not in capsys.readouterr().out  # made once


@pytest.mark.parametrize("preset, model", [("tiny-smoke", "tiny"), ("tiny-smoke", "tiny-wan"), ("ticft", "tiny")])
def test_validation_ends_after_the_denoising_step_in_which_a_stop_is_asked(preset, model, tiny_cache_dir, demo_dataset,
                                                                           tmp_path, request):
    """Guards validation ignoring a stop asked for meanwhile (its videos take minutes on a real model, past a
    scheduler's grace), and a TIC-FT run's step callback (the condition's re-injection) replacing the one that
    checks: asked at its third poll (before the first video, then after each denoising step), the validation ends
    there, writes nothing and leaves the transformer in training mode; never asked, it writes every video. On
    CogVideoX (plain and TIC-FT) and Wan, whose pipelines each call the step callback."""
    extra = ("ticft.layout=c1b1t1", "data.num_frames=9", "train.mixed_precision=\"no\"") if preset == "ticft" else ()
    config = load_config(preset, preset_overrides(tiny_cache_dir, "validation.prompts=[a slap, a stagger]",
                                                  "validation.num_inference_steps=5", *extra,
                                                  *_on_model(model, request, tmp_path)))
    run = setup(config, demo_dataset, tmp_path / "run", resume=None, progress=False, existing=set())
    assert (run.validator.ticft is not None) == (preset == "ticft") and run.resolved.spec.name == model
    transformer = run.accelerator.unwrap_model(run.transformer)
    transformer.train()
    polls = []

    def stop_at_third_poll() -> bool:
        polls.append(len(polls) + 1)
        return len(polls) >= 3

    assert run.validator.run(transformer, 1, stop_asked=stop_at_third_poll) == []
    assert polls == [1, 2, 3] and transformer.training
    assert not (tmp_path / "run" / "validation" / "step-000001").exists()
    made = run.validator.run(transformer, 1)
    assert [path.name for path in made] == ["prompt-00.mp4", "prompt-01.mp4"] and transformer.training


def test_a_fresh_runs_own_cache_of_many_clips_says_how_runs_share_one(tiny_cache_dir, demo_dataset, tmp_path, capsys,
                                                                       monkeypatch):
    """Guards every new --out encoding a large dataset again without a word (a walk-through's 2,500 clips: 20 minutes
    on the tiny model, while a whole cache of them sat in another folder): a run starting its own cache of at least
    `SHARED_CACHE_HINT_CLIPS` clips (lowered to the 4 demo clips here) says so and how to share one; a run given a
    shared cache says nothing of it, and neither does one resumed on its own filled cache."""
    import trainer.train as train_module

    monkeypatch.setattr(train_module, "SHARED_CACHE_HINT_CLIPS", 4)
    hint = "clips into this run's own latent cache"
    run = tmp_path / "run"
    steps = ("optim.lr_warmup_steps=0", "checkpoint.every_steps=1")
    train(_config(tiny_cache_dir, "train.max_train_steps=1", *steps), demo_dataset, run, progress=False)
    assert (f"encoding 4 clips into this run's own latent cache ({run / 'cache'}); with `--set latent_cache=FOLDER` "
            "runs share one, and each clip is encoded once for all of them") in capsys.readouterr().out
    train(_config(tiny_cache_dir, "train.max_train_steps=1", *steps), demo_dataset, run, resume="latest", progress=False)
    train(_config(tiny_cache_dir, "train.max_train_steps=1", *steps, f"latent_cache={tmp_path / 'shared'}"), demo_dataset,
          tmp_path / "other", progress=False)
    assert hint not in capsys.readouterr().out
