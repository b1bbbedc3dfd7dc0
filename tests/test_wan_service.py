"""Serving a Wan model end to end: one real `bentoml serve` with SLAP_MODEL=tiny-wan and a compiled
transformer, a Wan LoRA uploaded over HTTP, a TIC-FT Wan adapter animating an image, real mp4s decoded
back, and swaps that never recompile (/info counts them and names the model's family); the web studio on it
in Chromium (its limits from /info). One server for the module: tiny-wan's VAE is slow on a CPU and the
CI's budget is tight."""

from __future__ import annotations

import base64
import os
import shutil

import httpx
import numpy as np
import pytest

from slapgen.video import read_mp4
from tests.conftest import start_server, stop_server
from tests.test_studio import CHROMIUM
from tests.test_ticft import _encoded, _image

pytestmark = pytest.mark.slow
TOKEN = "wan-token"
PROMPT = "Power slap: the striker winds up and the palm strikes the cheek."


@pytest.fixture(scope="module")
def server(tiny_wan_cache_dir, wan_adapter_files, tmp_path_factory):
    """tiny-wan compiled, its slot rank 8, with a TIC-FT Wan adapter (c1b1t1) in the folder at start-up."""
    folder = tmp_path_factory.mktemp("wan-server")
    adapters = folder / "adapters"
    adapters.mkdir()
    shutil.copy(wan_adapter_files["ticft"], adapters / "animate.safetensors")
    running = start_server(
        folder, startup_timeout_s=900, SLAP_MODEL="tiny-wan", SLAP_CACHE_DIR=str(tiny_wan_cache_dir), SLAP_DEVICE="cpu",
        SLAP_COMPILE="1", SLAP_QUANT="none", SLAP_ADAPTERS_DIR=str(adapters), SLAP_MAX_LORA_RANK="8",
        SLAP_API_TOKEN=TOKEN,
    )
    yield running
    stop_server(running)


def _frames(server, tmp_path, name: str, **body) -> np.ndarray:
    """POST /generate (the default 9 frames, 2 steps, seed 3) and the mp4 decoded back."""
    body = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 2, **body}
    response = httpx.post(f"{server.url}/generate", json=body, timeout=600)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(response.content)
    return read_mp4(path)[0]


def test_a_wan_model_serves_uploaded_adapters_and_images_without_recompiling(server, wan_adapter_files, tmp_path):
    """Guards serving a Wan model: /generate on tiny-wan returns a decodable 9-frame mp4; a Wan LoRA uploaded
    over HTTP changes the clip, and swapping back to the base model gives the same clip as before; a TIC-FT
    Wan adapter animates a base64 image into its 4 target frames; /info names the model and its family
    ("wan") and counts 0 recompilations of the compiled transformer across the swaps base -> a -> animate
    -> a -> base."""
    base = _frames(server, tmp_path, "base")
    assert base.shape == (9, 64, 96, 3)
    uploaded = httpx.post(f"{server.url}/adapters/upload", headers={"Authorization": f"Bearer {TOKEN}"},
                          data={"name": "a"}, files={"file": ("a.safetensors", wan_adapter_files["a"].read_bytes())},
                          timeout=60)
    assert uploaded.status_code == 201, uploaded.text
    assert (uploaded.json()["rank"], uploaded.json()["base_model"]) == (4, "tiny-wan")
    with_a = _frames(server, tmp_path, "a", adapter="a")
    assert with_a.shape == base.shape and not np.array_equal(with_a, base)

    image = base64.b64encode(_encoded(_image(64, 96), "PNG")).decode()
    animated = _frames(server, tmp_path, "animated", adapter="animate", condition_image=image)
    assert animated.shape == (4, 64, 96, 3)

    assert np.array_equal(_frames(server, tmp_path, "a-again", adapter="a"), with_a)
    assert np.array_equal(_frames(server, tmp_path, "base-again"), base)
    info = httpx.get(f"{server.url}/info").json()
    assert (info["model"], info["family"], info["compiled"], info["recompilations"]) == ("tiny-wan", "wan", True, 0), info
    assert info["adapter_swaps"] == 3  # a, animate, a (the base model switches the slot off, no swap)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("SLAP_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_studio_takes_a_wan_models_limits_from_info_and_generates_with_it(server, tmp_path):
    """Guards a studio written for CogVideoX (49 frames in steps of 8, 720 x 480, 8 fps, 50 steps at guidance 6
    in the page) on a Wan model: in a real browser on this module's tiny-wan server, the frame choices are
    /info's frame rule (1, 5, ..., 81) at its default, the size fields take /info's maximum, multiple and
    default, the steps and guidance /info's defaults; the clip Generate makes with those values is exactly the
    one `POST /generate` makes for the same prompt and seed, at the model's own fps (16); and the TIC-FT Wan
    adapter animates an uploaded image into exactly the clip `POST /generate` makes from it."""
    from playwright.sync_api import sync_playwright

    from tests.test_studio import generate_and_fetch, mp4_frames, open_studio, png_bytes, submitted_bodies

    limits = httpx.get(f"{server.url}/info").json()["limits"]
    defaults = limits["defaults"]
    assert (limits["max_num_frames"], limits["frame_step"], limits["size_multiple"], defaults["fps"]) == (81, 4, 16, 16)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = open_studio(browser, server.url)
            bodies = submitted_bodies(page)
            frames = page.eval_on_selector_all("#num-frames option", "options => options.map((o) => Number(o.value))")
            assert frames == list(range(1, limits["max_num_frames"] + 1, limits["frame_step"]))
            assert page.input_value("#num-frames") == str(defaults["num_frames"])
            for field in ("width", "height"):
                shown = page.eval_on_selector(f"#{field}", "i => [i.max, i.step, i.min, i.value].map(Number)")
                assert shown == [limits[f"max_{field}"], limits["size_multiple"], limits["size_multiple"],
                                 defaults[field]]
            assert page.input_value("#steps") == str(defaults["num_inference_steps"])
            assert float(page.input_value("#guidance")) == defaults["guidance_scale"]

            page.check("input[name=prompt-source][value=text]")
            page.fill("#prompt", PROMPT)
            page.fill("#steps", "2")
            page.fill("#seed", "3")
            clip = mp4_frames(generate_and_fetch(page), tmp_path, "studio")
            assert bodies[-1]["num_frames"] == defaults["num_frames"]
            assert (bodies[-1]["width"], bodies[-1]["height"]) == (defaults["width"], defaults["height"])
            np.testing.assert_array_equal(clip, _frames(server, tmp_path, "reference"))
            _, fps = read_mp4(tmp_path / "studio.mp4")
            assert fps == defaults["fps"]

            page.select_option("#adapter", "animate")
            assert page.is_visible("#condition-fields") and page.is_disabled("#num-frames")
            upload = png_bytes(120, 160)
            page.set_input_files("#condition-file",
                                 files=[{"name": "a.png", "mimeType": "image/png", "buffer": upload}])
            page.wait_for_function("document.getElementById('condition-preview').naturalWidth > 0")
            animated = mp4_frames(generate_and_fetch(page), tmp_path, "studio-animated")
            assert animated.shape == (4, 64, 96, 3)
            np.testing.assert_array_equal(animated, _frames(server, tmp_path, "reference-animated", adapter="animate",
                                                            condition_image=base64.b64encode(upload).decode()))
            assert page.errors == []
        finally:
            browser.close()
