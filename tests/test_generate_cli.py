"""`slapgen generate` on the tiny model: a real CLI process animates a PNG with a TIC-FT adapter (the
mp4 decoded back equals the engine's frames for that image), text-to-video and templates in process,
and every mistake a person makes on the command line is one line on stderr, exit 2, no file written."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.models.loading import resolve_model
from slapgen.models.ticft import TicftLayout
from slapgen.video import read_mp4, write_mp4
from tests.conftest import REPO_ROOT, cli_stderr, offline_env, write_test_adapter
from tests.test_ticft import _encoded, _image
from trainer.cli import main as cli_main

pytestmark = pytest.mark.slow

PROMPT = "Power slap: the striker winds up and the palm strikes the cheek."
SETTINGS = {"num_inference_steps": 2, "height": 32, "width": 48}
SET_ARGS = [f"--set={key}={value}" for key, value in SETTINGS.items()]


@pytest.fixture(scope="module")
def inputs(tiny_cache_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate")
    lora = write_test_adapter(folder / "ticft", tiny_cache_dir, rank=4, seed=9, ticft_layout="c1b1t1")
    plain = write_test_adapter(folder / "plain", tiny_cache_dir, rank=4, seed=2)
    image = _image(40, 60, seed=3)
    png = folder / "face-off.png"
    png.write_bytes(_encoded(image, "PNG"))
    adapters = folder / "engine-adapters"
    adapters.mkdir()
    (adapters / "i2v.safetensors").symlink_to(lora)
    (adapters / "t2v.safetensors").symlink_to(plain)
    generator = VideoGenerator.load(resolve_model("tiny", tiny_cache_dir), EngineOptions(adapters_dir=adapters, max_lora_rank=4))
    return {"folder": folder, "lora": lora, "plain": plain, "png": png, "image": image, "generator": generator}


def reference(inputs, name: str, **params) -> np.ndarray:
    """The engine's frames for the same request, through the same mp4 encoder, decoded back."""
    generator = inputs["generator"]
    frames = generator.generate_frames(GenerationParams.defaults_for(generator.spec, **SETTINGS, **params))
    path = inputs["folder"] / f"reference-{name}.mp4"
    write_mp4(frames, path, generator.spec.fps)
    return read_mp4(path)[0]


def test_a_ticft_adapter_animates_an_image_from_the_command_line(inputs, tiny_cache_dir, tmp_path):
    """Guards the CLI's condition image path (not read, read without the training resize and crop, the
    clip length not the layout's, the condition frames left in): a real `python -m trainer generate`
    process writes the mp4 the engine makes from that image, the target frames only, and the whole clip
    with --include-condition-frames."""
    layout = TicftLayout.parse("c1b1t1")
    out = tmp_path / "slap.mp4"
    command = [sys.executable, "-m", "trainer", "generate", "--model", "tiny", "--prompt", PROMPT, "--seed", "4",
               "--adapter", str(inputs["lora"]), "--condition-image", str(inputs["png"]), "--out", str(out), *SET_ARGS]
    result = subprocess.run(command, cwd=REPO_ROOT, env=offline_env(tmp_path, SLAP_CACHE_DIR=str(tiny_cache_dir)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}: 4 frames of 32x48" in result.stdout and "TIC-FT c1b1t1" in result.stdout
    made = read_mp4(out)[0]
    assert made.shape[0] == layout.pixel_frames - layout.condition_pixel_frames
    expected = reference(inputs, "i2v", prompt=PROMPT, seed=4, adapter="i2v", num_frames=layout.pixel_frames,
                         condition_image=inputs["image"])
    np.testing.assert_array_equal(made, expected)

    whole = tmp_path / "whole.mp4"
    assert cli_main(["generate", "--model", "tiny", "--prompt", PROMPT, "--seed", "4", "--adapter", str(inputs["lora"]),
                     "--condition-image", str(inputs["png"]), "--include-condition-frames", "--out", str(whole),
                     *SET_ARGS]) == 0
    np.testing.assert_array_equal(read_mp4(whole)[0], reference(
        inputs, "i2v-whole", prompt=PROMPT, seed=4, adapter="i2v", num_frames=layout.pixel_frames,
        condition_image=inputs["image"], include_condition_frames=True))


def test_text_to_video_with_a_plain_adapter_and_from_a_template(inputs, tmp_path):
    """Guards a plain LoRA not applied (or applied at the wrong scale) and a template rendered otherwise
    than the service renders it: each mp4 equals the engine's frames for the same settings."""
    from prompts import default_library

    out = tmp_path / "plain.mp4"
    assert cli_main(["generate", "--model", "tiny", "--prompt", PROMPT, "--seed", "1", "--adapter", str(inputs["plain"]),
                     "--set", "adapter_scale=0.5", "--set", "num_frames=9", "--out", str(out), *SET_ARGS]) == 0
    np.testing.assert_array_equal(read_mp4(out)[0], reference(inputs, "t2v", prompt=PROMPT, seed=1, adapter="t2v",
                                                              adapter_scale=0.5, num_frames=9))
    templated = tmp_path / "template.mp4"
    assert cli_main(["generate", "--model", "tiny", "--template", "wind-up-and-strike", "--slot", "hand=left",
                     "--set", "num_frames=9", "--out", str(templated), *SET_ARGS]) == 0
    rendered = default_library().render("wind-up-and-strike", {"hand": "left"})
    np.testing.assert_array_equal(read_mp4(templated)[0], reference(inputs, "template", prompt=rendered, num_frames=9))


@pytest.mark.parametrize("arguments, message", [
    (["--adapter", "{lora}"], "adapter ticft is a TIC-FT adapter (layout c1b1t1): give --condition-image, the frame "
                              "to animate, as a PNG or JPEG file"),
    (["--condition-image", "{png}"], "--condition-image needs a TIC-FT adapter (one trained with `slapgen train "
                                     "--config ticft`); no adapter was given"),
    (["--adapter", "{plain}", "--condition-image", "{png}"], "--condition-image needs a TIC-FT adapter (one trained with "
                                                              "`slapgen train --config ticft`); adapter plain is not one"),
    (["--include-condition-frames"], "--include-condition-frames applies only to a TIC-FT adapter with a "
                                     "--condition-image"),
    (["--adapter", "{lora}", "--condition-image", "{png}", "--set", "num_frames=17"],
     "a TIC-FT adapter of layout c1b1t1 generates 9 frames (4 after the condition); leave --set num_frames out or set "
     "it to 9, got 17"),
    # A count the model's rule refuses: the layout's sentence, not "must be 8k+1, got 5" (which sent users to 9 or 17).
    (["--adapter", "{lora}", "--condition-image", "{png}", "--set", "num_frames=5"],
     "a TIC-FT adapter of layout c1b1t1 generates 9 frames (4 after the condition); leave --set num_frames out or set "
     "it to 9, got 5"),
    (["--condition-image", "{folder}/nope.png", "--adapter", "{lora}"], "--condition-image {folder}/nope.png: no such file"),
    (["--condition-image", "{lora}", "--adapter", "{lora}"], "--condition-image {lora}: the image is not a PNG or JPEG"),
    (["--adapter", "{folder}/missing.safetensors"], "--adapter {folder}/missing.safetensors: no such file or folder"),
    # the service's adapters folder, not a run: named as typed (it read "--adapter engine-adapters={folder}/...")
    (["--adapter", "{folder}/engine-adapters"], "--adapter {folder}/engine-adapters: the folder has no "
                                                "pytorch_lora_weights.safetensors"),
    (["--template", "haymaker"], "either --prompt or --template"),
    (["--out-name"], None),
    (["--set", "seed=3"], "seed is chosen by its own option"),
    (["--device", "cuda"], "needs a CUDA GPU") if not torch.cuda.is_available() else (["--seed", "-1"], "--seed must"),
    (["--set", "num_frames=10"], "--set num_frames"),
])
def test_bad_input_is_one_line_and_exit_2(arguments, message, inputs, tmp_path, capsys):
    """Guards tracebacks, half-written mp4s, and messages that do not name the option to fix or that speak of
    the HTTP request's fields ("give condition_image ... as a base64 PNG" to a person who typed options)."""
    values = {"lora": inputs["lora"], "plain": inputs["plain"], "png": inputs["png"], "folder": inputs["folder"]}
    arguments = [argument.format(**values) for argument in arguments]
    message = message and message.format(**values)
    out = tmp_path / "x.mp4"
    if arguments == ["--out-name"]:  # the output must be an mp4 file
        arguments, out, message = [], tmp_path / "x.gif", "name it e.g. slap.mp4"
    code = cli_main(["generate", "--model", "tiny", "--prompt", PROMPT, "--out", str(out), *SET_ARGS, *arguments])
    error = cli_stderr(capsys.readouterr().err)
    assert code == 2 and message in error and len(error.splitlines()) == 1, error
    assert not re.search(r"\bcondition_image\b|include_condition_frames|base64", error), error
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fields_become_options_only_where_they_stand_alone():
    """Guards `in_option_terms` rewriting a field's spelling inside a name: an adapter named after its folder
    (`runs/ticft-num_frames`) was said as `ticft---set num_frames`, a name no folder has."""
    from trainer.generate import in_option_terms

    sentence = "adapter ticft-num_frames (runs/num_frames_9) wants num_frames 9; leave num_frames out, got num_frames."
    assert in_option_terms(sentence, "num_frames") == (
        "adapter ticft-num_frames (runs/num_frames_9) wants --set num_frames 9; leave --set num_frames out, got "
        "--set num_frames.")
    assert in_option_terms("give condition_image", "condition_image") == "give --condition-image"
    assert in_option_terms("needs a TIC-FT adapter", "condition_image") == "--condition-image: needs a TIC-FT adapter"
