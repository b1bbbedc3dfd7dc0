"""The web studio in a real browser (Playwright driving Debian's Chromium) against the real service on
the tiny model: generate from a template to a playing video, cancel, compare, blind-rate, and the
rating still in the summary after a restart. Screenshots of every view go to $SLAP_TEST_ARTIFACTS
(else the test's tmp folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server, stop_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium and sets SLAP_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping.
if not os.environ.get("SLAP_REQUIRE_BROWSER"):
    pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def studio_home(tmp_path_factory, tiny_cache_dir, adapter_files):
    folder = tmp_path_factory.mktemp("studio")
    (folder / "adapters").mkdir()
    shutil.copy(adapter_files["a"], folder / "adapters" / "powerslap.safetensors")
    return folder


def serve(folder: Path, tiny_cache_dir: Path):
    return start_server(folder, SLAP_MODEL="tiny", SLAP_CACHE_DIR=str(tiny_cache_dir),
                        SLAP_ADAPTERS_DIR=str(folder / "adapters"), SLAP_DATA_DIR=str(folder / "data"),
                        SLAP_MAX_LORA_RANK="8")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("SLAP_TEST_ARTIFACTS") or tmp_path_factory.mktemp("studio-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_studio(browser, url: str, width: int = 1280, height: int = 900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(f"{url}/studio")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    return page


def video_state(page, selector: str) -> dict:
    return page.eval_on_selector(selector, "v => ({ready: v.readyState, duration: v.duration, width: v.videoWidth,"
                                           " decoded: v.getVideoPlaybackQuality().totalVideoFrames})")


def wait_for_video(page, selector: str) -> dict:
    # HAVE_CURRENT_DATA or better: at least one frame decoded and the duration known.
    page.wait_for_function(f"document.querySelector('{selector}').readyState >= 2", timeout=180_000)
    return video_state(page, selector)


def test_the_studio_generates_cancels_compares_and_keeps_blind_ratings(browser, studio_home, tiny_cache_dir, artifacts):
    """Guards a studio that only looks right: every view is driven like a person would, and each result
    is checked where it lands (decoded video frames, the job's state on the service, the ratings store
    after a restart)."""
    server = serve(studio_home, tiny_cache_dir)
    try:
        page = open_studio(browser, server.url)
        # Generate: a template, slots filled, the caption re-rendered as the slot changes.
        page.select_option("#template", "knockout")
        page.select_option("#slot-striker", "green")
        page.wait_for_function("document.getElementById('rendered').textContent.includes('green')")
        page.fill("#steps", "3")
        page.click("#generate")
        generated = wait_for_video(page, "#result-video")
        assert generated["duration"] > 0 and generated["width"] == 96, generated
        assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [3, 3]
        assert page.inner_text("#progress-text").startswith("step 3 of 3")
        assert page.locator("#history li").count() == 1
        page.screenshot(path=str(artifacts / "studio-generate.png"), full_page=True)

        # Cancel: a long job stops within a step, and the service says so.
        page.fill("#steps", "200")
        page.click("#generate")
        page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('step')", timeout=120_000)
        page.click("#cancel")
        page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('cancelled')",
                               timeout=120_000)
        assert "denoising steps" in page.inner_text("#progress-text")
        assert page.locator("#history li").count() == 1  # a cancelled job adds nothing
        page.screenshot(path=str(artifacts / "studio-cancelled.png"), full_page=True)
        page.fill("#steps", "2")

        # Compare: base against the adapter, the same seed, two videos side by side.
        page.click("#tab-compare")
        page.select_option("#compare-a", "base")
        page.select_option("#compare-b", "powerslap")
        page.click("#compare-run")
        page.wait_for_function("!document.getElementById('compare-play').disabled", timeout=180_000)
        for side in ("a", "b"):
            assert wait_for_video(page, f"#compare-video-{side}")["duration"] > 0
        page.screenshot(path=str(artifacts / "studio-compare.png"), full_page=True)

        # Blind rating: systems hidden until the rating is saved.
        page.click("#tab-rate")
        page.select_option("#rate-a", "base")
        page.select_option("#rate-b", "powerslap")
        page.click("#pair-new")
        page.wait_for_selector("#rating-form:not([hidden])", timeout=180_000)
        for side in ("left", "right"):
            assert wait_for_video(page, f"#rate-video-{side}")["duration"] > 0
        shown = page.inner_text("#rate-pair") + page.inner_text("#rate-status") + page.inner_text("#rating-form")
        assert "powerslap" not in shown and "base" not in shown, shown
        for criterion in ("motion_accuracy", "impact_realism", "prompt_adherence", "overall"):
            page.check(f"input[name=criterion-{criterion}][value=left]")
        page.fill("#rater", "ana")
        page.screenshot(path=str(artifacts / "studio-rate.png"), full_page=True)
        page.click("#rating-submit")
        page.wait_for_function("document.getElementById('rate-reveal').textContent.startsWith('Saved')")
        revealed = page.inner_text("#rate-reveal")
        left = "base" if revealed.startswith("Saved. Left was base") else "powerslap"
        assert page.errors == []
    finally:
        stop_server(server)

    # The rating survives a restart and shows in the summary: left won every criterion.
    server = serve(studio_home, tiny_cache_dir)
    try:
        stored = httpx.get(f"{server.url}/ratings.csv").text.splitlines()
        assert len(stored) == 1 + 4 and all(",ana," in line for line in stored[1:])
        page = open_studio(browser, server.url)
        page.click("#tab-summary")
        page.wait_for_selector("#summary-table tbody tr")
        rows = page.locator("#summary-table tbody tr").all_inner_texts()
        assert len(rows) == 4, rows
        first_won = left == "base"  # systems are listed sorted: base first
        for row in rows:
            cells = row.split("\t")
            assert cells[:2] == ["base", "powerslap"], cells
            assert cells[3] == ("100%" if first_won else "0%"), cells
        page.screenshot(path=str(artifacts / "studio-summary.png"), full_page=True)
        phone = open_studio(browser, server.url, width=390, height=844)
        phone.screenshot(path=str(artifacts / "studio-phone.png"), full_page=True)
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")  # nothing off-screen
    finally:
        stop_server(server)
