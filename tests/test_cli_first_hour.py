"""A new user's first hour with the `slapgen` command line (issue 19): a repeated `slapgen train` never
destroys a finished run, a failed start leaves no folder behind, the CLI says it has started before
its slow imports, captioning without torchvision is one sentence, a default tiny eval runs, and a
misspelt `--set` key or preset gets the closest real one."""

from __future__ import annotations

import importlib.util
import json
import shutil
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, cli_stderr, offline_env, tiny_train_overrides
from trainer import checkpoints
from trainer.cli import LOADING_COMMANDS, loading_line
from trainer.cli import main as cli_main
from trainer.lora import LORA_FILENAME

# 32x32, one frame, two clips: a run of a few steps takes seconds on the CPU.
SMALL = ("data.height=32", "data.width=32", "data.num_frames=1", "data.max_clips=2", "optim.lr_warmup_steps=1",
         "train.gradient_checkpointing=false")
HEAVY_IMPORT = re.compile(r"\|\s+(torch|diffusers|transformers)$")


def _train_args(tiny_cache_dir, data, out, *extra_sets, flags=()):
    args = ["train", "--config", "tiny-smoke", "--data", str(data), "--out", str(out), *flags]
    for item in tiny_train_overrides(tiny_cache_dir, *SMALL, *extra_sets):
        args += ["--set", item]
    return args


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_repeated_train_command_is_refused_and_overwrite_starts_clean(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards the data loss of issue 19: `slapgen train` run again into a finished run folder started over
    silently, overwriting the LoRA and checkpoints and appending a second steps 1-N to metrics.jsonl.
    It must refuse in one line naming `--resume latest` and `--overwrite`, changing no file; `--overwrite`
    must then start over in a clean folder (only the new run's checkpoints, each step logged once) and
    keep the latent cache; `--resume` with `--overwrite` is refused."""
    run = tmp_path / "run"
    first = _train_args(tiny_cache_dir, demo_dataset, run, "train.max_train_steps=4", "checkpoint.every_steps=1",
                        "checkpoint.keep_last=3")
    assert cli_main(first) == 0
    assert [p.name for p in checkpoints.list_checkpoints(run)] == [f"checkpoint-00000{step}" for step in (2, 3, 4)]
    before = {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()

    assert cli_main(first) == 2
    error = cli_stderr(capsys.readouterr().err)
    assert "\n" not in error and error.startswith(f"slapgen train: {run} already holds a run")
    assert "--resume latest" in error and "--overwrite" in error and "metrics up to step 4" in error
    after = {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before

    cache_entries = {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*.safetensors")}
    assert cache_entries
    again = _train_args(tiny_cache_dir, demo_dataset, run, "train.max_train_steps=4", "checkpoint.every_steps=4",
                        flags=["--overwrite"])
    assert cli_main(again) == 0
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["checkpoint-000004"]  # not 2 and 3 of the old run
    assert _logged_steps(run) == [1, 2, 3, 4]
    assert {p: p.stat().st_mtime_ns for p in (run / "cache").rglob("*.safetensors")} == cache_entries  # reused, not re-encoded
    assert "2 clips ready (0 encoded" in capsys.readouterr().out

    assert cli_main([*again, "--resume", "latest"]) == 2
    assert "give one of them" in capsys.readouterr().err
    # Resuming the finished run says it is complete (it said only "resumed from ... at step 4").
    finished = _train_args(tiny_cache_dir, demo_dataset, run, "train.max_train_steps=4", "checkpoint.every_steps=4",
                           flags=["--resume", "latest"])
    assert cli_main(finished) == 0
    assert ("the run is complete (step 4 of 4): nothing is left to train, and its LoRA is written again from its last "
            "checkpoint; to train further, start a new run with another --out") in capsys.readouterr().out
    assert _logged_steps(run) == [1, 2, 3, 4]


def test_an_interrupted_run_points_to_resume_and_resume_still_works(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards the refusal catching a run stopped with --stop-at-step (not only a finished one), and the
    refusal getting in the way of `--resume latest`, which must continue the run to its end with each
    step logged once."""
    run = tmp_path / "run"
    args = _train_args(tiny_cache_dir, demo_dataset, run, "train.max_train_steps=4", "checkpoint.every_steps=2")
    assert cli_main([*args, "--stop-at-step", "2"]) == 0
    capsys.readouterr()
    assert cli_main(args) == 2
    assert "continue it with --resume latest" in capsys.readouterr().err
    assert not (run / LORA_FILENAME).exists()
    assert cli_main([*args, "--resume", "latest"]) == 0
    assert (run / LORA_FILENAME).is_file() and _logged_steps(run) == [1, 2, 3, 4]


def test_a_resume_on_other_clips_is_refused_naming_them(tiny_cache_dir, demo_dataset, tmp_path, capsys, monkeypatch):
    """Guards `--resume latest` training on whatever --data now holds: a resume with another dataset, or after a
    caption changed, went on without a word (a changed config is refused). It is refused naming the clips that
    differ and both datasets, before any step; with the run's own clips it continues, after an upgrade that
    changed the latent cache's format too (a record by cache key called every clip changed then)."""
    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    run = tmp_path / "run"
    args = _train_args(tiny_cache_dir, data, run, "train.max_train_steps=2", "checkpoint.every_steps=1")
    assert cli_main([*args, "--stop-at-step", "1"]) == 0
    caption = (data / "clip_001.txt").read_text()
    (data / "clip_001.txt").write_text("A cat sleeps on a sofa.")
    capsys.readouterr()
    assert cli_main([*args, "--resume", "latest"]) == 2
    assert cli_stderr(capsys.readouterr().err).endswith(
        f"slapgen train: the clips differ from the run's (1 changed in content or caption (clip_001.mp4); --data {data} "
        f"now, {data} in the run): --resume continues that run on its own clips, so resume with them; to train on "
        "these, start a new run with another --out")
    other = _train_args(tiny_cache_dir, tmp_path / "elsewhere", run, "train.max_train_steps=2", "checkpoint.every_steps=1")
    shutil.copytree(demo_dataset, tmp_path / "elsewhere", ignore=shutil.ignore_patterns("clip_000.*"))
    assert cli_main([*other, "--resume", "latest"]) == 2
    assert "(1 added (clip_002.mp4); 1 gone (clip_000.mp4); --data" in capsys.readouterr().err
    assert _logged_steps(run) == [1]
    (data / "clip_001.txt").write_text(caption)
    monkeypatch.setattr("trainer.latent_cache.CACHE_FORMAT", 99)  # every clip encoded again, none changed
    assert cli_main([*args, "--resume", "latest"]) == 0
    assert _logged_steps(run) == [1, 2]


def test_train_ends_pointing_to_what_to_look_at_next(tiny_cache_dir, demo_dataset, tmp_path, capsys, monkeypatch):
    """Guards `slapgen train` ending with only `LoRA written to ...` (a new user's walk-through): its last lines
    also name the final validation videos, metrics.jsonl, the TensorBoard command and how to serve the LoRA,
    each only when the run wrote it, with paths that work from where the command ran (the adapters folder
    absolute: `bentoml serve` runs in the service's folder) and the adapter the service names after the folder."""
    from slapgen.engine.adapters import adapter_names

    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "smoke"
    assert cli_main(_train_args(tiny_cache_dir, demo_dataset, run, "train.max_train_steps=3",
                                "validation.every_steps=2", "validation.num_inference_steps=1", "validation.prompts=[a slap]",
                                "logging.tensorboard=true")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-5:] == [
        f"LoRA written to {run / LORA_FILENAME}",
        "validation videos: runs/smoke/validation/step-000003 (the final LoRA's; earlier steps' beside it in "
        "runs/smoke/validation)",
        "metrics: runs/smoke/metrics.jsonl (a JSON line per logged step)",
        "TensorBoard: tensorboard --logdir runs/smoke/logs",
        f"serve it: SLAP_MODEL=tiny SLAP_ADAPTERS_DIR={tmp_path / 'runs'} bentoml serve {REPO_ROOT}, "
        'then ask for "adapter": "smoke"',
    ]
    assert (run / "validation" / "step-000003" / "prompt-00.mp4").is_file()
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # what the TensorBoard line points at
    assert adapter_names(tmp_path / "runs") == ["smoke"]  # the adapter the serve line names

    # No validation prompts, no TensorBoard, a folder name that is no adapter name: only what exists, and an upload.
    other = Path("runs") / "Smoke.2"
    assert cli_main(_train_args(tiny_cache_dir, demo_dataset, other, "train.max_train_steps=2", "validation.prompts=[]",
                                "logging.tensorboard=false")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3:] == [
        f"LoRA written to {other / LORA_FILENAME}",
        "metrics: runs/Smoke.2/metrics.jsonl (a JSON line per logged step)",
        "serve it: upload it to a running server as a name of 1-64 characters of a-z, 0-9, _ and -: curl -X POST "
        'http://127.0.0.1:3000/adapters/upload -H "Authorization: Bearer $SLAP_API_TOKEN" -F name=NAME '
        "-F file=@runs/Smoke.2/pytorch_lora_weights.safetensors",
    ]

    # Stopped early: the run has no final LoRA yet, so it points only to --resume.
    stopped = Path("runs") / "stopped"
    assert cli_main([*_train_args(tiny_cache_dir, demo_dataset, stopped, "train.max_train_steps=3"),
                     "--stop-at-step", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "stopped at step 1; continue with --resume latest"


def test_one_last_logged_step_reads_the_last_complete_line_of_any_length(tmp_path):
    """Guards the two `last_logged_step`s that disagreed: the refusal to start over a run read the highest
    step of the whole metrics.jsonl, a sweep's progress the last line within the file's last 4 KiB (0 for a
    run whose lines are longer). One reader serves both: the last complete line, however long, passing
    over a line cut by a kill; reading only the tail of a long file of short lines."""
    from trainer import run_folder
    from trainer.sweep import sweep

    assert sweep.last_logged_step is run_folder.last_logged_step
    assert run_folder.last_logged_step(tmp_path) == 0  # no metrics.jsonl
    metrics = tmp_path / run_folder.METRICS_FILE
    long_lines = [json.dumps({"step": step, "loss": 0.5, "note": "x" * 5000}) for step in (1, 2, 3)]
    metrics.write_text("\n".join(long_lines) + '\n{"step": 4, "lo')  # killed while writing step 4
    assert run_folder.last_logged_step(tmp_path) == 3
    metrics.write_text("".join(json.dumps({"step": step, "loss": 0.5}) + "\n" for step in range(1, 2001)))
    assert run_folder.last_logged_step(tmp_path) == 2000
    metrics.write_text("not json\n")
    assert run_folder.last_logged_step(tmp_path) == 0


def test_a_failed_start_leaves_no_run_folder(tiny_cache_dir, tmp_path, capsys):
    """Guards the half-made run folder (config.yaml, an empty cache) a failed start left behind: a missing
    dataset, or one whose every clip is unreadable, ends in one line and no folder; a folder that was
    there before is left as it was."""
    missing = _train_args(tiny_cache_dir, tmp_path / "no-such-dataset", tmp_path / "run")
    assert cli_main(missing) == 2
    assert "no-such-dataset" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "clip_000.mp4").write_bytes(b"not a video at all")
    (broken / "clip_000.txt").write_text("Power slap: the striker winds up and the palm lands on the cheek.\n")
    assert cli_main(_train_args(tiny_cache_dir, broken, tmp_path / "run")) == 2
    assert "no usable clips" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine\n")
    assert cli_main(_train_args(tiny_cache_dir, broken, kept)) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_an_eval_stopped_before_it_wrote_anything_leaves_no_out_folder(tiny_cache_dir, demo_dataset, tmp_path, capsys,
                                                                       monkeypatch):
    """Guards the empty --out folder an eval left when it stopped on its held-out clips (a caption that is not
    UTF-8): the folder it made is gone, and a folder that was there before stays."""
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tiny_cache_dir))
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    shutil.copy(demo_dataset / "clip_000.mp4", heldout / "clip_000.mp4")
    (heldout / "clip_000.txt").write_bytes(b"Power slap \xff\xfe")
    for out, made in ((tmp_path / "eval", False), (tmp_path / "there", True)):
        if made:
            out.mkdir()
        assert cli_main(["eval", "--model", "tiny", "--heldout", str(heldout), "--out", str(out),
                         "--metrics", "loss"]) == 2
        assert "caption of clip_000.mp4 is not valid UTF-8" in capsys.readouterr().err
        assert out.exists() == made


def _imports(tmp_path, *args) -> tuple[subprocess.CompletedProcess, set[str]]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer", *args], cwd=REPO_ROOT,
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    return result, {match[1] for line in result.stderr.splitlines() if (match := HEAVY_IMPORT.search(line))}


@pytest.mark.slow
def test_help_and_config_skip_the_heavy_imports(tmp_path):
    """Guards `slapgen --help` importing torch (the parser asked torch for the default --device) and every
    command importing diffusers and transformers up front: --help imports none of them, nor does `slapgen config`
    (which reads the model families: they import torch only where they compute with it)."""
    result, heavy = _imports(tmp_path, "--help")
    assert result.returncode == 0 and "usage: slapgen" in result.stdout
    assert heavy == set()
    result, heavy = _imports(tmp_path, "train", "--help")
    assert result.returncode == 0 and "--overwrite" in result.stdout and heavy == set()
    result, heavy = _imports(tmp_path, "config", "tiny-smoke")
    assert result.returncode == 0 and "model: tiny" in result.stdout
    assert heavy == set()


def test_curate_imports_no_torch_diffusers_or_transformers(demo_dataset, tmp_path):
    """Guards curate importing torch, diffusers and transformers (3 s, under a "loading torch and diffusers" line,
    before its first clip) though it reads clips with ffmpeg and computes with numpy: it came in through the clip
    reader's module (trainer.frames), whose ffmpeg helpers curate uses. A whole curate of the demo clips imports
    none of them and says no loading line."""
    result, heavy = _imports(tmp_path, "curate", str(demo_dataset), "--out", str(tmp_path / "curated"), "--config",
                             "tiny-smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "curated" / "report.json").is_file() and loading_line("curate") not in result.stderr
    assert heavy == set()


MISTYPED = [  # (command line, what the one sentence says, what it may import first)
    (["generate", "--model", "tiny", "--out", "{tmp}/x.mp4", "--template", "nope"],
     "unknown template 'nope'; valid templates: face-off", set()),
    (["generate", "--model", "tiny", "--out", "{tmp}/x.mp4", "--template", "knockout", "--slot", "nope=1"],
     "template knockout has no slot 'nope'", set()),
    (["train", "--config", "tiny-smok", "--data", "{tmp}", "--out", "{tmp}/run"], "did you mean tiny-smoke?", set()),
    (["train", "--config", "tiny-smoke", "--data", "{tmp}", "--out", "{tmp}/run", "--set", "lora.rnk=4"],
     "lora.rnk: no such setting (did you mean lora.rank?)", set()),
    (["curate", "{tmp}", "--out", "{tmp}/curated", "--select", "0"], "--select must be at least 1", set()),
    (["eval", "--model", "tiny", "--heldout", "{tmp}", "--out", "{tmp}/eval", "--metrics", "los"],
     "--metrics los: choose from", set()),
    (["eval", "--model", "tiny", "--heldout", "{tmp}", "--out", "{tmp}/eval", "--set", "steps=2"],
     "--set steps=2: steps is not a setting here; KEY is one of num_inference_steps, guidance_scale, negative_prompt, "
     "num_frames, height, width, fps, adapter_scale (did you mean num_inference_steps?)", set()),
    (["generate", "--model", "tiny", "--out", "{tmp}/x.mp4", "--prompt", "a slap", "--set", "num_frames=many"],
     "--set num_frames=many: num_frames must be a whole number", set()),
    (["generate", "--model", "tiny", "--out", "{tmp}/x.mp4", "--prompt", "a slap", "--adapter", "{tmp}/nope"],
     "--adapter {tmp}/nope: no such file or folder", set()),
    (["curate", "{tmp}/nope", "--out", "{tmp}/curated"], "dataset {tmp}/nope does not exist", set()),
    (["train", "--config", "tiny-smoke", "--data", "{tmp}/nope", "--out", "{tmp}/run"],
     "dataset {tmp}/nope does not exist", set()),
    (["precompute", "{tmp}/nope", "--out", "{tmp}/cache"], "dataset {tmp}/nope does not exist", set()),
    (["eval", "--model", "tiny", "--heldout", "{tmp}/nope", "--out", "{tmp}/eval"], "dataset {tmp}/nope does not exist",
     set()),
    (["caption", "{tmp}/nope"], "{tmp}/nope is not a folder of clips", set()),
    (["sweep", "--config", "tiny-smoke", "--grid", "lora.rnk=4,8", "--data", "{data}", "--heldout", "{data}",
      "--out", "{tmp}/sweep"], "lora.rnk: no such setting", {"torch"}),
]


@pytest.mark.parametrize("arguments, message, may_import", MISTYPED,
                         ids=["generate-template", "generate-slot", "train-preset", "train-set", "curate-select",
                              "eval-metrics", "eval-set", "generate-set", "generate-adapter", "curate-dataset", "train-data",
                              "precompute-dataset", "eval-heldout", "caption-folder", "sweep-grid"])
def test_a_mistyped_option_is_said_before_diffusers_and_transformers_load(arguments, message, may_import, demo_dataset,
                                                                           tmp_path):
    """Guards a typo answered only after the seconds of importing diffusers and transformers (4-5 s here for
    `generate --template nope`, `train --config tiny-smok`, `eval --metrics los`...): each command's check of
    what was typed runs right after the loading line, and the sentence comes before any heavy import: none at all
    for generate, train, curate, precompute, caption and eval (the model families, which the training config reads,
    import torch only where they use it: 0.19 s for `train --config tiny-smok`, 1.4 s before; `generate --set`
    and eval's checks imported torch through the engine's modules, 3.7 s before `--set nokey` was said; a dataset
    or an adapter that does not exist was said after torch by curate, precompute, caption and generate, after a
    model download's failure by train, and by eval after its output folder was made), only torch for the sweep's,
    whose check reads modules that compute with it."""
    command = [argument.replace("{tmp}", str(tmp_path)).replace("{data}", str(demo_dataset)) for argument in arguments]
    message = message.replace("{tmp}", str(tmp_path))
    result, heavy = _imports(tmp_path, *command)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    said_first = [loading_line(command[0])] if command[0] in LOADING_COMMANDS else []  # curate loads no model
    assert result.returncode == 2 and errors[:-1] == said_first, errors
    assert errors[-1].startswith(f"slapgen {command[0]}: ") and message in errors[-1], errors
    assert heavy <= may_import, heavy
    assert not any((tmp_path / name).exists() for name in ("x.mp4", "run", "curated", "eval", "sweep", "cache"))


def test_the_sweeps_check_downloads_no_model(hub, tiny_wan_cache_dir, demo_dataset, tmp_path, monkeypatch):
    """Guards the sweep's check of what was typed (before the heavy imports) downloading a model only a download
    identifies, gigabytes before the loading is under way (a review's find): it plans without resolving models,
    as train's check reads the config without; the run itself downloads as before."""
    import trainer.sweep.sweep
    from slapgen.models.tiny_wan import materialise_tiny_wan_model

    hub.add_repo("someone/tiny-wan-copy", materialise_tiny_wan_model(tiny_wan_cache_dir))
    planned = []
    monkeypatch.setattr(trainer.sweep.sweep, "run_sweep", lambda *args, **kwargs: planned.append(hub.requests[:]))
    assert cli_main(["sweep", "--config", "tiny-smoke", "--set", "model=someone/tiny-wan-copy", "--set",
                     f"model_cache_dir={tmp_path / 'models'}", "--grid", "lora.rank=4,8", "--data", str(demo_dataset),
                     "--heldout", str(demo_dataset), "--out", str(tmp_path / "sweep")]) == 0
    assert planned == [[]]  # the run was reached, and the check before it asked the hub for nothing


@pytest.mark.slow
def test_train_says_it_has_started_before_importing_torch(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards a CLI silent for 20-90 s while it imports: a real `slapgen train` process prints its first
    line (on stderr) before torch is imported (stdout and stderr, where -X importtime writes, in one pipe, in order)."""
    command = [sys.executable, "-u", "-X", "importtime", "-m", "trainer",
               *_train_args(tiny_cache_dir, demo_dataset, tmp_path / "run")]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line.rstrip("\n"))
            if line.startswith("slapgen train:") or HEAVY_IMPORT.search(line.rstrip("\n")):
                break
    finally:
        process.kill()
        process.wait()
    assert seen and seen[-1] == "slapgen train: loading torch and diffusers ...", seen[-5:]
    assert not any(HEAVY_IMPORT.search(line) for line in seen)


@pytest.mark.slow
def test_precompute_stdout_is_only_the_json_of_skipped_clips(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards `slapgen precompute | jq` failing: the `slapgen precompute: loading torch and diffusers ...` line,
    the summary and each `skipped CLIP: why` line went to stdout around the JSON list of skipped clips. A
    real process's stdout must parse as that JSON alone; the people's lines are on stderr."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("clip_000.mp4", "clip_000.txt", "clip_001.mp4", "clip_001.txt"):
        (data / name).write_bytes((demo_dataset / name).read_bytes())
    (data / "clip_002.mp4").write_bytes(b"not a video at all")
    (data / "clip_002.txt").write_text("Power slap: the striker winds up and the palm lands on the cheek.\n")
    result = subprocess.run([sys.executable, "-m", "trainer", "precompute", str(data), "--model", "tiny", "--out",
                             str(tmp_path / "cache"), "--config", "tiny-smoke", "--device", "cpu", "--set",
                             f"model_cache_dir={tiny_cache_dir}"],
                            cwd=REPO_ROOT, env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = json.loads(result.stdout)
    assert [clip["video"] for clip in skipped] == ["clip_002.mp4"], result.stdout
    assert "2 clips ready (2 encoded, 0 reused); skipped: 1 " in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith("slapgen precompute: loading torch and diffusers ...\n"), result.stderr[:300]


HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.mark.slow
@pytest.mark.skipif(HAVE_TORCHVISION, reason="checks the path without torchvision")
def test_caption_without_torchvision_is_one_sentence_before_any_model_is_built(demo_dataset, tmp_path):
    """Guards `slapgen caption --model tiny` without torchvision printing a 20-line traceback: the
    torchvision check ran after the tiny model was being built. It must be one line naming the fix, with
    nothing written to the model cache. The fix is README's command, with PyTorch's CPU index: without it
    (as the sentence said before) pip on a CPU machine takes the 3 GB CUDA builds of the pair."""
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "clip_000.mp4").write_bytes((demo_dataset / "clip_000.mp4").read_bytes())
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "trainer", "caption", str(folder), "--model", "tiny", "--device", "cpu"],
                            cwd=REPO_ROOT, env=offline_env(tmp_path, SLAP_CACHE_DIR=str(cache)), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    fix = "pip install torch==2.14.1 torchvision==0.29.1 --extra-index-url https://download.pytorch.org/whl/cpu"
    assert cli_stderr(result.stderr).splitlines() == [
        f"slapgen caption: captioning needs torchvision (transformers' video processors use it); {fix} (the CPU "
        "builds; on a GPU machine, the torchvision matching your torch)."]
    assert f"\n{fix} && pip install -e '.[caption]'" in (REPO_ROOT / "README.md").read_text()
    assert not cache.exists() and not (folder / "clip_000.txt").exists()


def test_fvd_length_is_the_shortest_the_model_makes_that_holds_fvds_clip(tmp_path):
    """Guards tiny's default eval failing on FVD (its 9 frames are below the I3D's minimum): with fvd
    measured and num_frames not set, videos get the shortest 8k+1 length holding StyleGAN-V's 16-frame
    clip; a default already long enough, or a num_frames the user set, is kept (and still checked)."""
    from slapgen.evaluation.i3d import FVD_FRAMES
    from slapgen.models.specs import COGVIDEOX_5B
    from slapgen.models.tiny import TINY_SPEC
    from trainer.errors import EvalError
    from trainer.evaluate.options import EvalOptions

    def frames(spec, metrics, generation=None):
        options = EvalOptions(model="m", adapters=(), heldout=tmp_path, out=tmp_path, metrics=metrics,
                              generation=generation or {})
        return options.params(spec).num_frames

    shortest = min(n for n in range(FVD_FRAMES, 50) if (n - 1) % 8 == 0)  # CogVideoX 1.0 makes 8k+1 frames
    assert shortest == 17 and TINY_SPEC.default_num_frames < FVD_FRAMES
    assert frames(TINY_SPEC, ("loss", "clip", "fvd", "temporal")) == shortest
    assert frames(TINY_SPEC, ("clip", "temporal")) == TINY_SPEC.default_num_frames  # no FVD: the model's default
    assert frames(COGVIDEOX_5B, ("fvd",)) == COGVIDEOX_5B.default_num_frames == 49
    assert frames(TINY_SPEC, ("fvd",), {"num_frames": 25}) == 25
    with pytest.raises(EvalError, match="fvd needs videos of at least 10 frames"):
        frames(TINY_SPEC, ("fvd",), {"num_frames": 9})


@pytest.mark.slow
def test_a_default_tiny_eval_runs_end_to_end(tiny_cache_dir, demo_dataset, tmp_path):
    """Guards `slapgen eval --model tiny` with default settings stopping on FVD's frame minimum: a real
    process with nothing but the required options writes every metric, its videos decode to 17 frames."""
    from slapgen.video import read_mp4

    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "trainer", "eval", "--model", "tiny", "--heldout", str(demo_dataset),
                             "--out", str(out), "--max-clips", "2"], cwd=REPO_ROOT,
                            env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["systems"]["base"]["metrics"]) == {"heldout_loss", "clip_score_tiny", "fvd_i3d",
                                                            "subject_consistency_dino", "temporal_flickering"}
    assert evaluation["generation"]["num_frames"] == 17
    assert evaluation["systems"]["base"]["fvd_i3d_detail"]["n_a"] == 2
    for video in evaluation["videos"]:
        assert len(read_mp4(out / video["path"])[0]) == 17


@pytest.mark.parametrize("args, expected", [
    (["train", "--config", "tiny-smoke", "--data", "d", "--out", "o", "--set", "lora.rnk=2"], "lora.rank"),
    (["config", "tiny-smoke", "--set", "optim.learnig_rate=1e-3"], "optim.learning_rate"),
    (["curate", "d", "--out", "o", "--set", "data.num_frame=9"], "data.num_frames"),
    (["precompute", "d", "--model", "tiny", "--out", "o", "--set", "data.heigth=32"], "data.height"),
    (["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=2,4", "--data", "DEMO", "--heldout", "DEMO", "--out", "o",
      "--set", "train.max_train_step=2"], "train.max_train_steps"),
    (["sweep", "--config", "tiny-smoke", "--grid", "optim.learning_rat=1e-3,1e-2", "--data", "DEMO", "--heldout", "DEMO",
      "--out", "o"], "optim.learning_rate"),
    (["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=2,4", "--data", "DEMO", "--heldout", "DEMO", "--out", "o",
      "--metrics", "loss,clip", "--eval-set", "num_inference_step=2"], "num_inference_steps"),
    (["eval", "--model", "tiny", "--heldout", "h", "--out", "o", "--set", "num_frame=17"], "num_frames"),
    (["generate", "--model", "tiny", "--prompt", "p", "--out", "o.mp4", "--set", "guidance=3"], "guidance_scale"),
    # Other trainers' names and keys in the wrong section: spelling alone suggested `optim`, `train`, `lora`.
    (["config", "tiny-smoke", "--set", "optim.lr=1e-4"], "optim.learning_rate"),
    (["config", "tiny-smoke", "--set", "lr=1e-4"], "optim.learning_rate"),
    (["config", "tiny-smoke", "--set", "network_dim=32"], "lora.rank"),
    (["config", "tiny-smoke", "--set", "rank=32"], "lora.rank"),
    (["config", "tiny-smoke", "--set", "train.steps=5"], "train.max_train_steps"),
    (["config", "tiny-smoke", "--set", "seed=3"], "train.seed"),
])
def test_a_misspelt_set_key_suggests_the_closest(args, expected, demo_dataset, tmp_path, monkeypatch, capsys):
    """Guards a wrong `--set` (or `--grid`, `--eval-set`) key answered with the list of every key or a
    pydantic message and no hint, in every command that takes one: the error is one line with
    `did you mean KEY?`, and nothing is written. Also guards the hint for another trainer's name or a key
    in the wrong section being a section or a wrong setting (`optim.lr` -> `optim`, `rank` -> `train`)."""
    monkeypatch.chdir(tmp_path)
    assert cli_main([str(demo_dataset) if arg == "DEMO" else arg for arg in args]) == 2
    error = cli_stderr(capsys.readouterr().err)
    assert "\n" not in error and f"did you mean {expected}?" in error, error
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_preset_suggests_the_closest(tmp_path, capsys):
    """Guards `--config tiny-smok` answered with the list of presets only: the sentence names the preset it
    misspells, as a misspelt --set key's does (and `slapgen config` says the same)."""
    assert cli_main(["config", "tiny-smok"]) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        "slapgen config: config tiny-smok not found: did you mean tiny-smoke? (presets: aggressive, conservative, "
        "ticft, tiny-smoke)")


def test_help_names_wan_and_both_tiny_models():
    """Guards `slapgen --help` saying "Teach CogVideoX" and every --model help offering only `tiny`: a new user
    who reads --help never learns that Wan and its CPU twin `tiny-wan` are there, nor that `--set model=` picks
    the model to train."""
    from trainer.cli import build_parser

    parser = build_parser()
    assert "Wan" in parser.description
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for command in ("precompute", "eval", "generate"):
        model = next(action for action in commands[command]._actions if action.dest == "model")
        assert "`tiny` or `tiny-wan`" in model.help, command
    train_set = next(action for action in commands["train"]._actions if action.dest == "set")
    assert "model=tiny-wan" in train_set.help


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_an_adapter_of_another_model_is_refused_before_the_slow_work(command, tiny_cache_dir, wan_adapter_files,
                                                                       demo_dataset, tmp_path, capsys):
    """Guards `slapgen eval --model tiny --adapter w=<a tiny-wan LoRA>` encoding the held-out clips, loading the
    pipeline and scoring the base model (hours on a real model) before the adapter was refused, and then with
    a list of 16 modules: both commands say which model it was trained on before anything is written."""
    out = tmp_path / "out"
    args = {"eval": ["eval", "--model", "tiny", "--adapter", f"w={wan_adapter_files['a']}", "--heldout",
                     str(demo_dataset), "--out", str(out), "--metrics", "loss"],
            "generate": ["generate", "--model", "tiny", "--adapter", str(wan_adapter_files["a"]), "--prompt", "a slap",
                         "--out", str(out / "clip.mp4")]}[command]
    assert cli_main(args) == 2
    name = "w" if command == "eval" else "a"  # generate names it after its folder
    # The starting line, then the refusal: no progress bar of encoding, loading or denoising in between.
    assert capsys.readouterr().err.splitlines() == [
        f"slapgen {command}: loading torch and diffusers ...",
        f"slapgen {command}: adapter {name} was trained on tiny-wan, but the model here is tiny; use it with that "
        "model (SLAP_MODEL=tiny-wan, or --model tiny-wan on the command line)"]
    assert not out.exists()


def test_curate_says_what_too_short_means(demo_dataset, tmp_path, capsys):
    """Guards `slapgen curate clips --out o` (README's Curation example, no --config) flagging every demo clip
    `too_short: 4` with nothing on what the length is measured against: the default config's training length
    (conservative: 49 frames at 8 fps), which --config changes."""
    assert cli_main(["curate", str(demo_dataset), "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    assert ("\n  too_short: 4 (fewer than 49 frames at 8 fps, the training length of --config conservative): "
            "clip_000.mp4, clip_001.mp4, clip_002.mp4, and 1 more\n") in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_or_sigterm_during_training_saves_the_step_it_ended_as_a_checkpoint(tiny_cache_dir, demo_dataset,
                                                                                   tmp_path):
    """Guards a Ctrl-C losing every step since the last periodic checkpoint (a walk-through's Ctrl-C at step 388
    resumed from 300), a scheduler's SIGTERM (Slurm's preemption, Kubernetes, `accelerate launch` passing on a
    Ctrl-C) doing the same, and advice to `--resume latest` where no checkpoint was: a real `slapgen train`
    process sent SIGTERM mid-run (checkpoints every 1000 steps, none due) ends the step under way, saves it as a
    checkpoint and exits 143 naming it; `--resume latest` continues from that step, and is sent SIGINT: the
    same, exit 130. The advice is said once, by the command (inside a sweep, training's own "continue with
    --resume latest" contradicted the sweep's)."""
    run = tmp_path / "run"
    args = _train_args(tiny_cache_dir, demo_dataset, run, "train.max_train_steps=5000", "checkpoint.every_steps=1000",
                       "logging.every_steps=1")

    def stop_mid_run(signum: int, start: int, *flags: str) -> tuple[str, str, str]:
        """Train from step `start` until 3 more steps are logged, send `signum`; (stdout, stderr, the checkpoint it
        saved)."""
        # SIGINT at its default in the training process, as in a terminal's foreground: a suite run in the
        # background (`pytest &`, a CI runner's shell) has it ignored, the child inherits that, and training rightly
        # keeps ignoring a SIGINT it was started ignoring (test_stopped_runs.py): the test then trained to the end.
        process = subprocess.Popen([sys.executable, "-m", "trainer", *args, *flags], cwd=REPO_ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir)),
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300
            while not ((run / "metrics.jsonl").is_file() and max(_logged_steps(run), default=0) >= start + 3):
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()
                time.sleep(0.2)
            process.send_signal(signum)
            out, err = process.communicate(timeout=120)
        finally:
            process.kill()
        saved = sorted(path.name for path in (run / "checkpoints").iterdir())
        steps = [int(name.removeprefix("checkpoint-")) for name in saved]
        assert process.returncode == 128 + signum and steps[:-1] == ([start] if start else []), (
            process.returncode, saved, err[-2000:])
        step = steps[-1]
        assert start + 3 <= step < 5000 and _logged_steps(run)[-1] == step
        # One piece of advice, the command's (a sweep's run said "--resume latest" above the sweep's "rerun the
        # same command")
        asked = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        assert f"{asked} at step {step}, saved as a checkpoint\n" in out and "--resume latest" not in out
        return out, err, saved[-1]

    out, err, checkpoint = stop_mid_run(signal.SIGTERM, 0)
    assert "SIGTERM: the step under way ends and a checkpoint of it is saved" in out + err
    assert cli_stderr(err).endswith(f"slapgen train: stopped by SIGTERM; finished work is kept (add --resume latest "
                                    f"to continue from {checkpoint})"), err[-2000:]
    step = int(checkpoint.removeprefix("checkpoint-"))
    out, err, checkpoint = stop_mid_run(signal.SIGINT, step, "--resume", "latest")
    assert f"resumed from {run / 'checkpoints' / f'checkpoint-{step:06d}'} at step {step}" in out
    assert cli_stderr(err).endswith(f"slapgen train: interrupted; finished work is kept (run the same command to "
                                    f"continue from {checkpoint})"), err[-2000:]  # it has --resume latest
    step = int(checkpoint.removeprefix("checkpoint-"))
    resumed = subprocess.run([sys.executable, "-m", "trainer", *args, "--resume", "latest", "--stop-at-step",
                              str(step + 1)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                             env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir)))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / checkpoint} at step {step}" in resumed.stdout
    assert _logged_steps(run)[-1] == step + 1


@pytest.mark.slow
def test_a_stop_asked_for_during_validation_ends_it_and_the_next_step_is_the_checkpoint(tiny_cache_dir, demo_dataset,
                                                                                      tmp_path):
    """Guards a Ctrl-C or a scheduler's SIGTERM during validation waiting for every validation video: on a real
    model they take minutes, longer than a scheduler's grace (Kubernetes' 30 s), so the job was killed before its
    checkpoint. A real `slapgen train` is sent SIGTERM once the first of 6 validation videos of step 2 is written:
    the validation ends there (fewer than 6 videos, said in one line), the next step is the stop's checkpoint,
    and the run exits 143."""
    run = tmp_path / "run"
    prompts = ", ".join(f"a slap number {index}" for index in range(6))
    args = _train_args(tiny_cache_dir, demo_dataset, run, "train.max_train_steps=50", "checkpoint.every_steps=1000",
                       "logging.every_steps=1", "validation.every_steps=2", "validation.num_inference_steps=200",
                       f"validation.prompts=[{prompts}]")
    process = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir)))
    videos = run / "validation" / "step-000002"
    try:
        deadline = time.monotonic() + 300
        while not any(videos.glob("prompt-*.mp4")):  # the validation of step 2 is under way
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    made = sorted(path.name for path in videos.glob("prompt-*.mp4"))
    assert process.returncode == 143, (process.returncode, made, err[-2000:])
    assert 1 <= len(made) < 6 and made == [f"prompt-{index:02d}.mp4" for index in range(len(made))], made
    assert (f"validation at step 2 ended after {len(made)} of 6 videos: a stop was asked for (the rest are not "
            "made: the checkpoint is the next step)\n") in out, out
    assert [path.name for path in (run / "checkpoints").iterdir()] == ["checkpoint-000003"]
    assert _logged_steps(run)[-1] == 3 and not (run / "validation" / "step-000004").exists()
    assert "stopped by SIGTERM at step 3, saved as a checkpoint\n" in out


def test_resume_naming_no_checkpoint_is_refused_before_any_clip_is_encoded(tiny_cache_dir, demo_dataset, tmp_path,
                                                                           capsys):
    """Guards `--resume latest` in a folder without a checkpoint, and `--resume lastest`, checked only after every
    clip was encoded (then the new folder, its cache included, removed): refused first, nothing written, a typo of
    latest named."""
    run = tmp_path / "fresh"
    assert cli_main(_train_args(tiny_cache_dir, demo_dataset, run, flags=("--resume", "latest"))) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        f"slapgen train: --resume latest: no checkpoint in {run / 'checkpoints'} (without --resume the run starts "
        "from step 0)")
    assert not run.exists()
    assert cli_main(_train_args(tiny_cache_dir, demo_dataset, run, flags=("--resume", "lastest"))) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        "slapgen train: --resume lastest: not a checkpoint folder (no trainer_state.json); did you mean --resume latest?")
    assert not run.exists()


def test_an_out_folder_inside_the_dataset_or_another_runs_outputs_is_refused(tiny_cache_dir, demo_dataset, tmp_path,
                                                                            capsys):
    """Guards `--out` equal to `--data` training into the dataset (the next run read its validation videos as
    clips without captions) and `--out runs/smoke/checkpoints` nesting a run inside another's checkpoints (which
    that run prunes): each refused in one sentence before anything is written; a sibling folder is fine."""
    import shutil

    data = tmp_path / "demo"
    shutil.copytree(demo_dataset, data)
    assert cli_main(_train_args(tiny_cache_dir, data, data)) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        f"slapgen train: --out {data} is inside the dataset {data}, which reads every video under it: the run's "
        "validation videos would become clips without captions; choose an --out outside it (e.g. runs/NAME)")
    assert cli_main(_train_args(tiny_cache_dir, data, data / "runs" / "a")) == 2
    capsys.readouterr()
    other = tmp_path / "runs" / "smoke"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.yaml").write_text("model: tiny\n")
    assert cli_main(_train_args(tiny_cache_dir, data, other / "checkpoints" / "b")) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        f"slapgen train: --out {other / 'checkpoints' / 'b'} is inside the checkpoints folder of the run {other}, "
        "which that run prunes, rewrites or deletes; choose an --out of its own (e.g. runs/NAME)")
    assert sorted(path.name for path in data.iterdir()) == sorted(path.name for path in demo_dataset.iterdir())
    assert not (other / "checkpoints" / "b").exists()


@pytest.mark.parametrize("command", [["demo-data", "{out}"], ["curate", "{data}", "--out", "{out}"],
                                     ["train", "--config", "tiny-smoke", "--data", "{data}", "--out", "{out}"]])
def test_an_ffmpeg_that_cannot_run_is_said_before_anything_is_read_or_written(command, demo_dataset, tmp_path,
                                                                              monkeypatch, capsys):
    """Guards a broken IMAGEIO_FFMPEG_EXE read as every clip corrupt (curate: "corrupt: 8"; train: "no usable
    clips") or a traceback (demo-data, generate, leaving an empty folder): one sentence naming it, nothing made."""
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))
    out = tmp_path / "out"
    argv = [part.format(out=out, data=demo_dataset) for part in command]
    assert cli_main(argv) == 2
    assert cli_stderr(capsys.readouterr().err) == (
        f"slapgen {command[0]}: ffmpeg {tmp_path / 'no-ffmpeg'} (IMAGEIO_FFMPEG_EXE) is not an executable file, and "
        "every video is read and written with it; unset IMAGEIO_FFMPEG_EXE to use the one imageio-ffmpeg bundles, "
        "or point it at an ffmpeg")
    assert not out.exists()


@pytest.mark.parametrize("command", [
    ["demo-data", "{out}"],
    ["curate", "{data}", "--out", "{out}"],
    ["precompute", "{data}", "--out", "{out}"],
    ["train", "--config", "tiny-smoke", "--data", "{data}", "--out", "{out}"],
    ["eval", "--model", "tiny", "--heldout", "{data}", "--out", "{out}"],
    ["sweep", "--config", "tiny-smoke", "--grid", "lora.rank=4,8", "--data", "{data}", "--heldout", "{data}", "--out", "{out}"],
    ["generate", "--model", "tiny", "--prompt", "a slap", "--out", "{out}/slap.mp4"],
])
def test_an_output_folder_named_where_a_file_is_is_one_sentence(command, demo_dataset, tmp_path, capsys):
    """Guards `--out README.md` (a slip of the tab key) ending in mkdir's traceback, `FileExistsError` in train, eval
    and precompute, `NotADirectoryError` in curate (a walk-through's find; demo-data and sweep had sentences of their
    own; generate's mp4 in a "folder" that is a file too): every command that writes a folder says so in one
    sentence, for the file itself and for a file on the way to the folder, and the file is left as it was."""
    from trainer.cli import main as cli_main

    a_file, broken = tmp_path / "README.md", tmp_path / "runs-link"
    a_file.write_text("mine")
    broken.symlink_to(tmp_path / "gone")  # a link whose target is not there (mkdir: FileExistsError too)
    cases = [(a_file, f"{a_file} is a file"), (broken, f"{broken} is a broken link"),
             (a_file / "runs", f"{a_file / 'runs'} is inside {a_file}, a file")]
    for out, said in cases[2:] if command[0] == "generate" else cases:  # generate's --out names the mp4 in it
        argv = [part.format(out=out, data=demo_dataset) for part in command]
        assert cli_main(argv) == 2
        assert cli_stderr(capsys.readouterr().err) == (
            f"slapgen {command[0]}: {said}: the output goes into a folder (one that is not there is made)")
    assert a_file.read_text() == "mine" and not (tmp_path / "gone").exists()


def test_demo_data_refuses_what_it_cannot_make_and_keeps_clips_already_there(tmp_path, capsys):
    """Guards `demo-data --clips 0` ending in a traceback (`demo-data README.md`: the next test), and a rerun overwriting captions
    edited by hand: one sentence each, nothing made; a rerun keeps the clips there and writes the missing ones,
    which are the clips a first run makes."""
    assert cli_main(["demo-data", str(tmp_path / "none"), "--clips", "0"]) == 2
    assert cli_stderr(capsys.readouterr().err) == "slapgen demo-data: --clips must be at least 1, got 0"
    assert not (tmp_path / "none").exists()
    first, again = tmp_path / "first", tmp_path / "again"
    assert cli_main(["demo-data", str(first), "--clips", "3"]) == 0
    assert cli_main(["demo-data", str(again), "--clips", "2"]) == 0
    (again / "clip_000.txt").write_text("my own caption\n")
    capsys.readouterr()
    assert cli_main(["demo-data", str(again), "--clips", "3"]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote 1 clip + caption to {again} (kept the 2 already there, "
                                               "captions as they are)")
    assert (again / "clip_000.txt").read_text() == "my own caption\n"
    assert (again / "clip_002.mp4").read_bytes() == (first / "clip_002.mp4").read_bytes()
    assert (again / "clip_002.txt").read_text() == (first / "clip_002.txt").read_text()


@pytest.mark.parametrize("argv, hint", [
    (["train", "--config", "tiny-smoke", "--data", "d", "--out", "o", "--lr", "1e-3"],
     "unrecognized arguments: --lr 1e-3; --lr: slapgen train sets it with --set optim.learning_rate=VALUE"),
    (["train", "--confg", "tiny-smoke", "--data", "d", "--out", "o"],
     "the following arguments are required: --config; --confg: did you mean --config?"),
    (["generate", "--model", "tiny", "--prompt", "x", "--out", "o.mp4", "--steps", "3"],
     "unrecognized arguments: --steps 3; --steps: slapgen generate sets it with --set num_inference_steps=VALUE"),
    (["train", "--config", "tiny-smoke", "--data", "d", "--out", "o", "--overwirte"],
     "unrecognized arguments: --overwirte; --overwirte: did you mean --overwrite?"),
])
def test_an_unknown_option_names_what_was_likely_meant(argv, hint, capsys):
    """Guards argparse's bare refusals: `--lr 1e-3` got the top-level usage and "unrecognized arguments" with no
    pointer to `--set optim.learning_rate=`, and `--confg` only "the following arguments are required: --config"."""
    with pytest.raises(SystemExit) as stopped:
        cli_main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {hint}")


@pytest.mark.parametrize("argv, hint", [(["trian", "--config", "tiny-smoke"], "trian: did you mean train?"),
                                        (["campaign", "craete", "x"], "craete: did you mean create?")])
def test_a_mistyped_command_names_the_one_likely_meant(argv, hint, capsys):
    """Guards `slapgen trian` answered with every command but not the one meant (a walk-through's find), at either
    level of commands. Only the hint is compared: argparse's own words for the choices differ between Pythons."""
    with pytest.raises(SystemExit) as stopped:
        cli_main(argv)
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice" in last and last.endswith(f"; {hint}")


def test_the_advice_after_a_ctrl_c_follows_what_the_run_folder_holds(tmp_path):
    """Guards `--resume latest` advised where no checkpoint is (refused then), and beside an `--overwrite` the run
    was started with (the two together are refused): the advice names what works, from what the folder holds."""
    from trainer.run_folder import after_interrupt

    run = tmp_path / "run"
    assert after_interrupt(run) == "rerun the same command: the clips encoded so far are kept"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    assert after_interrupt(run) == ("no checkpoint was saved yet: rerun with --overwrite to start again (the encoded "
                                    "clips are kept)")
    (run / "checkpoints" / "checkpoint-000003").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-000003" / "trainer_state.json").write_text('{"step": 3}')
    assert after_interrupt(run) == "add --resume latest to continue from checkpoint-000003"
    # a command that resumed already (it said "add --resume latest" to it)
    assert after_interrupt(run, resume="latest") == "run the same command to continue from checkpoint-000003"
    assert after_interrupt(run, resume="checkpoint-000001") == ("replace --resume checkpoint-000001 with --resume latest "
                                                                "to continue from checkpoint-000003")
    assert after_interrupt(run, overwrite=True) == ("replace --overwrite with --resume latest to continue from "
                                                    "checkpoint-000003")


TRAIN_MISTAKES = r"""
import json, sys
from trainer.cli import main

said = []
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    said.append([code, "torch" in sys.modules])
print(json.dumps(said))
"""


def test_training_says_its_inputs_mistakes_before_loading_torch(demo_dataset, tmp_path):
    """Guards a mistyped model, a list without clips, a file that is no dataset and a `--resume latest` with nothing
    to resume each said only after 5 s of torch and diffusers' imports (a walk-through's timings; other mistakes
    took 0.3 s): each is said by `slapgen train` with torch not imported. And curate's empty selection read only
    "holds no clips" (curate had selected none: every clip too short for the default --config): it says so."""
    (tmp_path / "empty.jsonl").write_text("\n")
    curation = tmp_path / "curation"  # curate's selection of none: every clip flagged (too short for --config)
    curation.mkdir()
    (curation / "report.json").write_text("{}")
    (curation / "selected.jsonl").write_text("")
    base = ["train", "--config", "tiny-smoke", "--out", str(tmp_path / "run")]
    mistakes = [[*base, "--data", str(demo_dataset), "--set", "model=tyni"],
                [*base, "--data", str(tmp_path / "empty.jsonl")],
                [*base, "--data", str(curation / "selected.jsonl")],
                [*base, "--data", str(demo_dataset / "clip_000.mp4")],
                [*base, "--data", str(demo_dataset), "--resume", "latest"]]
    done = subprocess.run([sys.executable, "-c", TRAIN_MISTAKES, json.dumps(mistakes)], cwd=REPO_ROOT,
                          env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == [[2, False]] * 5, done.stderr
    said = cli_stderr(done.stderr).splitlines()
    assert said == [
        "slapgen train: model=tyni is neither an existing folder nor a hub id like THUDM/CogVideoX-5b; fix the path, "
        "or use --set model=tiny to run the built-in tiny model.",
        f"slapgen train: dataset {tmp_path / 'empty.jsonl'} lists no clip",
        f"slapgen train: dataset {curation / 'selected.jsonl'} lists no clip (curate selected none: its summary, and "
        f"{curation / 'report.html'}, say why; too_short depends on --config)",
        f"slapgen train: dataset file {demo_dataset / 'clip_000.mp4'} must be .csv or .jsonl with 'video' and "
        "'caption' columns",
        f"slapgen train: --resume latest: no checkpoint in {tmp_path / 'run' / 'checkpoints'} (without --resume the run "
        "starts from step 0)"]
    assert not (tmp_path / "run").exists()


def test_a_curate_selection_of_none_says_no_training_can_use_it(demo_dataset, tmp_path, capsys):
    """Guards curate's "selected 0 (100 requested)" (the demo clips, all too short for the default --config) said as
    if it were a selection, the next train then failing on the empty list: the line says none is clean and that no
    training can use it, and the flags above it say why."""
    assert cli_main(["curate", str(demo_dataset), "--out", str(tmp_path / "curation"), "--select", "100",
                     "--workers", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  too_short: 4 (fewer than 49 frames at 8 fps") for line in printed), printed
    selected = next(line for line in printed if line.startswith("selected "))
    assert selected.startswith("selected 0 (100 requested)")
    assert selected.endswith("; none is clean (the flags above say why), so no training can use it")
