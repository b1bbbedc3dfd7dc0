"""`slapgen eval` end to end on the tiny model: a real process compares the base model with two
adapters (a finished training run folder and a LoRA file) and writes every metric and the report;
the report renders in headless Chromium with every video playable."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

from slapgen.evaluation import stats
from slapgen.models.family import family_named, family_of
from slapgen.models.loading import resolve_model
from slapgen.video import read_mp4
from tests.conftest import REPO_ROOT, cli_stderr, offline_env, tiny_train_overrides, write_test_adapter
from trainer.cli import main as cli_main
from trainer.config import DataConfig, load_config
from trainer.heldout import heldout_entries, heldout_losses
from trainer.latent_cache import LAST_REPORT
from trainer.lora import add_lora, load_lora_into

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
SETTINGS = ["num_frames=17", "height=32", "width=48", "num_inference_steps=1"]
METRICS = {"heldout_loss", "clip_score_tiny", "fvd_i3d", "subject_consistency_dino", "temporal_flickering"}


@pytest.fixture(scope="module")
def evaluation(tiny_cache_dir, demo_dataset, tmp_path_factory):
    """One `slapgen eval` run: base, `trained` (a 2-step `slapgen train` run folder), `random` (a LoRA file)."""
    from trainer.train import train

    root = tmp_path_factory.mktemp("eval")
    config = load_config("tiny-smoke", tiny_train_overrides(tiny_cache_dir, "train.max_train_steps=2", "optim.lr_warmup_steps=1",
                                                            "optim.learning_rate=0.05", "data.max_clips=2",
                                                            "checkpoint.every_steps=10"))
    train(config, demo_dataset, root / "run", progress=False)
    lora_file = write_test_adapter(root / "random", tiny_cache_dir, rank=8, seed=3)
    out = root / "out"
    command = [sys.executable, "-m", "trainer", "eval", "--model", "tiny", "--adapter", f"trained={root / 'run'}",
               "--adapter", f"random={lora_file}", "--heldout", str(demo_dataset), "--out", str(out),
               "--max-clips", "2", "--seeds", "1", "--device", "cpu", *[f"--set={s}" for s in SETTINGS]]
    result = subprocess.run(command, cwd=REPO_ROOT, env=offline_env(root, SLAP_CACHE_DIR=str(tiny_cache_dir)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"out": out, "run": root / "run", "lora": lora_file, "config": config, "stdout": result.stdout,
            "stderr": result.stderr,
            "result": json.loads((out / "eval.json").read_text())}


def test_eval_writes_every_metric_for_every_system(evaluation):
    """Guards a system or metric missing from eval.json, a non-finite value, a video that is not a real
    mp4 of the asked size and length, adapters reloaded instead of swapped, or the FVD sample-size
    warning and CLIP text policy left out of the output."""
    result, out = evaluation["result"], evaluation["out"]
    assert list(result["systems"]) == ["base", "trained", "random"]
    for name, system in result["systems"].items():
        assert set(system["metrics"]) == METRICS, name
        assert all(math.isfinite(value) for value in system["metrics"].values()), system["metrics"]
        if name != "base":
            assert set(system["ab_vs_base"]) == METRICS - {"fvd_i3d"}
    assert result["systems"]["trained"]["adapter"] == str((evaluation["run"] / "pytorch_lora_weights.safetensors").resolve())
    assert result["engine"]["adapter_swaps"] >= 2  # each adapter swapped into the one pipeline's slot
    assert len(result["videos"]) == 3 * 2  # systems x prompts x seeds
    for video in result["videos"]:
        frames, fps = read_mp4(out / video["path"])
        assert frames.shape == (17, 32, 48, 3) and fps == 8
    definitions = result["metric_definitions"]
    assert "first 77 CLIP tokens" in definitions["clip_score_tiny"]["text"]
    assert definitions["fvd_i3d"]["n_real"] == 2 and "small-sample bias" in definitions["fvd_i3d"]["warning"]
    # both counts, as the FVD table has them (it said "only 2 clips per set" beside 2 generated and 2 real, and a
    # walk-through's "4 clips per set" beside 8 generated and 4 real read wrong)
    assert definitions["fvd_i3d"]["warning"].startswith("only 2 held-out clips and 2 generated per system for ")
    detail = result["systems"]["base"]["fvd_i3d_detail"]
    assert detail["n_a"] == 2 and detail["n_b"] == 2 and detail["low"] <= detail["high"]
    assert "warning:" in evaluation["stdout"] and "report:" in evaluation["stdout"]
    assert "| system | heldout_loss ↓ |" in (out / "eval.md").read_text()
    # What a campaign compares before setting two folders' losses side by side (trainer/campaign.py).
    assert definitions["heldout_loss"]["objective"] == family_named("cogvideox").objective
    assert definitions["heldout_loss"]["objectives"] == dict.fromkeys(("base", "trained", "random"), "text-to-video")
    # the clips' length and size, which FVD's 16 frames or more change (a loss of other clips is another number)
    assert (definitions["heldout_loss"]["frames"], definitions["heldout_loss"]["size"]) == (17, [32, 48])
    vae = json.loads((resolve_model("tiny", evaluation["config"].model_cache_dir).folder / "vae" / "config.json").read_text())
    assert definitions["heldout_loss"]["latents"] == (  # the tiny CogVideoX VAE: 4x temporal, 2^(3 blocks - 1) spatial
        f"VAE {vae['temporal_compression_ratio']}x{2 ** (len(vae['block_out_channels']) - 1)}x"
        f"{2 ** (len(vae['block_out_channels']) - 1)} (frames x height x width), scaling factor {vae['scaling_factor']:g}")


def test_heldout_loss_through_the_slot_is_the_trained_loras(evaluation, tiny_cache_dir, demo_dataset):
    """Guards the hot-swap slot serving something other than the trained LoRA (wrong scaling, padding
    that changes the result, base model left active): the held-out loss eval reports for the base
    model and for the trained run equals the loss of a plain transformer, and of one with the run's
    LoRA loaded through peft as training saved it, on the same cache entries."""
    result = evaluation["result"]
    resolved = resolve_model("tiny", tiny_cache_dir)
    data = DataConfig(height=32, width=48, num_frames=17, fps=8, max_clips=2)
    entries = heldout_entries(demo_dataset, resolved, data, evaluation["out"] / "cache", progress=False)
    scheduler = CogVideoXDPMScheduler.from_pretrained(resolved.folder, subfolder="scheduler")
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolved.folder, subfolder="transformer")
    base = heldout_losses(transformer, scheduler, entries)
    add_lora(transformer, evaluation["config"].lora)
    load_lora_into(transformer, evaluation["run"] / "pytorch_lora_weights.safetensors")
    trained = heldout_losses(transformer, scheduler, entries)
    reported = [prompt["heldout_loss"] for prompt in result["prompts"]]
    assert [r["base"] for r in reported] == pytest.approx(base, rel=1e-6)
    assert [r["trained"] for r in reported] == pytest.approx(trained, rel=1e-5)
    assert all(abs(a - b) > 1e-6 for a, b in zip(base, trained))  # the LoRA changes the number
    assert result["systems"]["trained"]["metrics"]["heldout_loss"] == pytest.approx(sum(trained) / 2, rel=1e-5)


def test_ab_counts_are_the_per_video_comparisons(evaluation):
    """Guards A/B comparing the wrong pairs (another seed or prompt) or the wrong direction: wins, ties and
    losses recomputed from eval.json's per-video numbers against base on the same prompt and seed."""
    result = evaluation["result"]
    base = {(v["prompt"], v["seed"]): v for v in result["videos"] if v["system"] == "base"}
    for name in ("clip_score_tiny", "subject_consistency_dino", "temporal_flickering"):
        for system in ("trained", "random"):
            outcomes = [stats.outcome(v[name], base[(v["prompt"], v["seed"])][name], True)
                        for v in result["videos"] if v["system"] == system]
            reported = result["systems"][system]["ab_vs_base"][name]
            assert (reported["wins"], reported["ties"], reported["losses"]) == (
                outcomes.count(stats.WIN), outcomes.count(stats.TIE), outcomes.count(stats.LOSS))
            assert reported["units"] == 2 and reported["comparisons"] == 2


def test_report_is_offline_and_lists_every_video(evaluation):
    """Guards a report that fetches anything from the network (CDN script, font, stylesheet) or links a
    video that is not there."""
    html = (evaluation["out"] / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    sources = [part.split("'")[0] for part in html.split("<video src='")[1:]]
    assert len(sources) == 6 and all((evaluation["out"] / source).is_file() for source in sources)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium_with_playable_videos(evaluation, tmp_path):
    """Guards a report a browser cannot show: every video element decodes (H.264 in mp4, the right size),
    the metric table is there, nothing outside the report folder is requested; screenshot kept in tmp_path."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    report = evaluation["out"] / "report.html"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requested = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(report.as_uri())
            page.wait_for_function("Array.from(document.querySelectorAll('video')).every(v => v.readyState >= 2 || v.error)",
                                   timeout=30_000)
            videos = page.evaluate("Array.from(document.querySelectorAll('video'))"
                                   ".map(v => ({error: v.error && v.error.code, width: v.videoWidth, height: v.videoHeight}))")
            rows = page.locator("#metrics tr").count()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(videos) == 6 and all(v == {"error": None, "width": 48, "height": 32} for v in videos), videos
    assert rows == 4  # header + base + 2 adapters
    assert all(url.startswith(evaluation["out"].as_uri()) for url in requested), requested
    assert (tmp_path / "report.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "report.png", evaluation["out"] / "report.png")


@pytest.mark.parametrize("arguments, message", [
    (["--adapter", "base=x.safetensors"], "not `base`"),
    (["--adapter", "a=/no/such/file.safetensors"], "no such file or folder"),
    (["--metrics", "loss,vibes"], "choose from loss,clip,fvd,temporal"),
    (["--set", "seed=3"], "chosen by slapgen eval"),
    (["--set", "num_frames=9"], "at least 10 frames"),
    (["--seeds", "one"], "whole numbers"),
    # a close spelling is named; --seeds with no metric that generates was accepted without a word, and no video made
    (["--metrics", "loss,clips"], "choose from loss,clip,fvd,temporal (did you mean clip?)"),
    (["--metrics", "loss", "--seeds", "1,2"], "--seeds are the seeds videos are generated with, and --metrics loss "
                                              "generates none: add clip, fvd or temporal to --metrics"),
])
def test_bad_input_is_one_line_and_exit_2(arguments, message, tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards tracebacks (or half-made output folders) for mistakes a person makes on the command line."""
    code = cli_main(["eval", "--model", "tiny", "--heldout", str(demo_dataset), "--out", str(tmp_path / "out"),
                     "--set", "num_frames=17", *arguments])
    error = cli_stderr(capsys.readouterr().err)
    assert code == 2 and message in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "out").exists()



def test_fvd_on_a_short_ticft_layout_is_refused_before_anything_runs(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards README's tiny TIC-FT adapter (c1b1t1: 4 target frames) crashing `slapgen eval` with the I3D's
    traceback ("the I3D needs at least 10 frames, got 4") after every video was generated: FVD's frame
    minimum is checked against each TIC-FT adapter's target frames (4 * 1 for c1b1t1, below 10) before any
    output is written."""
    lora = write_test_adapter(tmp_path / "ticft", tiny_cache_dir, rank=4, seed=5, ticft_layout="c1b1t1")
    code = cli_main(["eval", "--model", "tiny", "--adapter", f"i2v={lora}", "--heldout", str(demo_dataset),
                     "--out", str(tmp_path / "out"), "--max-clips", "1", "--metrics", "fvd"])
    error = cli_stderr(capsys.readouterr().err)
    assert code == 2 and len(error.splitlines()) == 1, error
    assert "fvd needs videos of at least 10 frames" in error and "layout c1b1t1" in error and "its 4 target frames" in error
    assert not (tmp_path / "out").exists()


def test_a_ticft_adapters_loss_is_printed_beside_base_on_its_own_objective(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards the summary printing `base: heldout_loss X` (text-to-video) and `i2v: heldout_loss Y` (TIC-FT)
    as if they compared, with base's number on the TIC-FT objective nowhere in the terminal or eval.md's
    text: a line names it, as the mean of eval.json's per-prompt `base@c1b1t1` losses."""
    from trainer.evaluate.names import metric_text

    lora = write_test_adapter(tmp_path / "ticft", tiny_cache_dir, rank=4, seed=5, ticft_layout="c1b1t1")
    out = tmp_path / "out"
    code = cli_main(["eval", "--model", "tiny", "--adapter", f"i2v={lora}", "--heldout", str(demo_dataset),
                     "--out", str(out), "--max-clips", "2", "--metrics", "loss", "--set", "height=32", "--set", "width=48"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    per_prompt = [prompt["heldout_loss"]["base@c1b1t1"] for prompt in json.loads((out / "eval.json").read_text())["prompts"]]
    sentence = (f"base@c1b1t1: heldout_loss {metric_text(sum(per_prompt) / len(per_prompt))}, the base model on the "
                "TIC-FT c1b1t1 objective i2v trained; compare their heldout_loss with this, not with base's "
                "text-to-video one")
    assert sentence in printed.splitlines(), printed
    assert f"- {sentence}." in (out / "eval.md").read_text()

def test_loss_only_generates_nothing_and_reuses_a_shared_cache(evaluation, demo_dataset, tmp_path, capsys):
    """Guards `--metrics loss` (what a sweep runs after every training) generating videos or loading the
    evaluation models, and `--cache` not being shared: with the first run's latent cache it encodes
    nothing and reports the very held-out losses that run reported."""
    code = cli_main(["eval", "--model", "tiny", "--adapter", f"trained={evaluation['run']}", "--heldout", str(demo_dataset),
                     "--out", str(tmp_path / "out"), "--metrics", "loss", "--max-clips", "2", "--device", "cpu",
                     "--cache", str(evaluation["out"] / "cache"), *[f"--set={s}" for s in SETTINGS]])
    assert code == 0, capsys.readouterr().err[-2000:]
    cache_report = json.loads((evaluation["out"] / "cache" / LAST_REPORT).read_text())
    assert (cache_report["encoded"], cache_report["reused"]) == (0, 2)
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert {name: set(system["metrics"]) for name, system in result["systems"].items()} == {
        "base": {"heldout_loss"}, "trained": {"heldout_loss"}}
    assert set(result["systems"]["trained"]["ab_vs_base"]) == {"heldout_loss"}
    assert result["videos"] == [] and not (tmp_path / "out" / "videos").exists()
    assert list(result["metric_definitions"]) == ["heldout_loss"]
    first = evaluation["result"]["prompts"]
    for system in ("base", "trained"):  # the slot's rank differs (4 here, 8 there): equal up to rounding
        assert [p["heldout_loss"][system] for p in result["prompts"]] == pytest.approx(
            [p["heldout_loss"][system] for p in first], rel=1e-6)


def _cogvideox_reference():
    def training_scheduler(folder):
        return CogVideoXDPMScheduler.from_pretrained(folder, subfolder="scheduler")

    return CogVideoXTransformer3DModel, training_scheduler


def _wan_reference():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    return WanTransformer3DModel, lambda folder: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


# Per model: its cache fixture, a TIC-FT adapter (its layout's clip length is the eval's num_frames) and the
# plain diffusers classes the held-out reference is computed with. tiny-wan reuses the session's Wan TIC-FT
# adapter (c1b1t1, 9 frames: the tiny Wan VAE's decode is the cost on a CPU).
TICFT_EVAL_CASES = {
    "tiny": ("tiny_cache_dir", "c1b1t3", _cogvideox_reference),
    "tiny-wan": ("tiny_wan_cache_dir", "c1b1t1", _wan_reference),
}


@pytest.mark.parametrize("model", list(TICFT_EVAL_CASES))
def test_eval_scores_a_ticft_adapter_on_each_clips_first_frame(model, demo_dataset, tmp_path, capsys, request):
    """Guards a TIC-FT adapter scored like a plain one (no condition: the engine refuses it) or on the
    wrong condition: its videos are exactly what the engine makes from the first frame of the held-out
    clip each prompt comes from, with the layout's target frames. Its held-out loss is its own objective
    (the layout's cache, per-frame noise, target frames only), recomputed with the LoRA loaded through
    peft as training saved it, and its A/B is against the base model on that same objective, never
    against base's text-to-video loss. On CogVideoX and on Wan (its flow-matching TIC-FT objective, whose
    by-hand check is test_heldout's; the Wan pipeline's TIC-FT generation)."""
    import numpy as np

    from slapgen.engine.generator import VideoGenerator
    from slapgen.engine.params import EngineOptions, GenerationParams
    from slapgen.images import first_frame
    from slapgen.models.ticft import TicftLayout
    from slapgen.video import write_mp4
    from trainer.config import TicftConfig
    from trainer.datasets import read_dataset
    from trainer.evaluate.options import parse_settings

    cache_fixture, layout_name, reference = TICFT_EVAL_CASES[model]
    cache_dir = request.getfixturevalue(cache_fixture)
    layout = TicftLayout.parse(layout_name)
    if model == "tiny":
        lora = write_test_adapter(tmp_path / "ticft", cache_dir, rank=4, seed=5, ticft_layout=layout_name)
    else:
        lora = request.getfixturevalue("wan_adapter_files")["ticft"]  # rank 4, alpha 4, c1b1t1
    settings = [f"num_frames={layout.pixel_frames}", "height=32", "width=48", "num_inference_steps=1"]
    out = tmp_path / "out"
    arguments = ["eval", "--model", model, "--adapter", f"i2v={lora}", "--heldout", str(demo_dataset),
                 "--max-clips", "2", "--seeds", "1", "--device", "cpu", *[f"--set={s}" for s in settings]]
    assert cli_main([*arguments, "--out", str(out), "--metrics", "loss,temporal"]) == 0, capsys.readouterr().err[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert set(result["systems"]) == {"base", "i2v"}

    # Held-out loss: the layout's cache (first frame + target, the layout's frames), the TIC-FT objective.
    resolved = resolve_model(model, cache_dir)
    fps = result["generation"]["fps"]
    assert fps == resolved.spec.fps  # the model's own rate (8 for tiny, 16 for tiny-wan)
    data = DataConfig(height=32, width=48, num_frames=layout.pixel_frames, fps=fps, max_clips=2)
    entries = heldout_entries(demo_dataset, resolved, data, out / "cache", progress=False,
                              ticft=TicftConfig(layout=layout_name))
    transformer_class, training_scheduler = reference()
    scheduler = training_scheduler(resolved.folder)
    transformer = transformer_class.from_pretrained(resolved.folder, subfolder="transformer")
    base_ticft = heldout_losses(transformer, scheduler, entries, layout=layout)
    base_plain = heldout_losses(transformer, scheduler, heldout_entries(demo_dataset, resolved, data, out / "cache",
                                                                        progress=False))
    add_lora(transformer, load_config("tiny-smoke", [f"model={model}", "lora.rank=4", "lora.alpha=4"]).lora)
    load_lora_into(transformer, lora)
    adapter = heldout_losses(transformer, scheduler, entries, layout=layout)
    reported = [prompt["heldout_loss"] for prompt in result["prompts"]]
    assert [r["i2v"] for r in reported] == pytest.approx(adapter, rel=1e-5)
    assert [r[f"base@{layout_name}"] for r in reported] == pytest.approx(base_ticft, rel=1e-6)
    assert [r["base"] for r in reported] == pytest.approx(base_plain, rel=1e-6)
    assert result["systems"]["i2v"]["metrics"]["heldout_loss"] == pytest.approx(sum(adapter) / 2, rel=1e-5)
    assert result["systems"]["i2v"]["ticft_layout"] == layout_name
    assert "heldout_loss of TIC-FT adapters: " in (out / "eval.md").read_text()
    assert result["systems"]["base"]["heldout_loss_by_ticft_layout"] == {
        layout_name: pytest.approx(sum(base_ticft) / 2, rel=1e-6)}
    assert result["metric_definitions"]["heldout_loss"]["objectives"] == {"base": "text-to-video",
                                                                           "i2v": f"TIC-FT {layout_name} (first-frame)"}
    assert result["metric_definitions"]["heldout_loss"]["objective"] == family_of(resolved.spec).objective  # Wan: flow matching
    wins = sum(mine < base for mine, base in zip(adapter, base_ticft))
    ties = sum(mine == base for mine, base in zip(adapter, base_ticft))
    ab = result["systems"]["i2v"]["ab_vs_base"]["heldout_loss"]
    assert (ab["wins"], ab["ties"], ab["losses"]) == (wins, ties, 2 - wins - ties)
    assert all(abs(a - b) > 1e-4 * a for a, b in zip(base_ticft, base_plain))  # two objectives, two numbers

    # Videos: the first frame of each prompt's clip, the layout's target frames.
    generator = VideoGenerator.load(resolved, EngineOptions(adapters_dir=out / "adapters", max_lora_rank=4))
    params = GenerationParams.defaults_for(generator.spec, seed=1, **parse_settings(settings))  # as eval builds them
    for index, clip in enumerate(read_dataset(demo_dataset)[:2]):
        made, _ = read_mp4(out / "videos" / "i2v" / f"p{index:03d}-s1.mp4")
        assert made.shape[0] == layout.pixel_frames - layout.condition_pixel_frames
        frames = generator.generate_frames(params.replace(prompt=clip.caption, adapter="i2v", num_frames=layout.pixel_frames,
                                                          condition_image=first_frame(clip.video)))
        write_mp4(frames, tmp_path / f"reference-{index}.mp4", params.fps)
        assert np.array_equal(made, read_mp4(tmp_path / f"reference-{index}.mp4")[0])


def test_ab_on_heldout_loss_uses_the_reference_it_is_given():
    """Guards a TIC-FT adapter's held-out-loss A/B taken against base's text-to-video loss: with per-clip
    losses where the two references disagree on every clip, the counts follow `loss_base`."""
    from trainer.evaluate.run import ab_vs_base

    losses = {"i2v": [1.0, 2.0, 3.0], "base": [0.5, 1.5, 2.5], "base@c1b1t3": [1.5, 2.5, 3.5]}
    against_layout = ab_vs_base("i2v", losses, [], [], {}, "base@c1b1t3")["heldout_loss"]
    against_plain = ab_vs_base("i2v", losses, [], [], {})["heldout_loss"]
    assert (against_layout["wins"], against_layout["losses"]) == (3, 0)
    assert (against_plain["wins"], against_plain["losses"]) == (0, 3)


def test_a_campaign_is_made_from_a_real_eval_run(evaluation, tmp_path, monkeypatch):
    """Issue 20: `slapgen campaign create --from` the real output of `slapgen eval` (reusing this module's
    run, no extra generation): its three systems, both prompts at seed 1, videos copied byte for byte,
    and eval's metrics (per video: CLIP and temporal scores; per system only: held-out loss and FVD)
    reaching the leaderboard's agreement report after a rater answers every pair over the routes."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from slapgen.campaign_store import CampaignStore
    from slapgen.serving.campaign_routes import campaign_routes

    monkeypatch.setenv("SLAP_DATA_DIR", str(tmp_path / "data"))
    assert cli_main(["campaign", "create", "real", "--from", str(evaluation["out"]), "--systems", "base,trained,random"]) == 0
    store = CampaignStore(tmp_path / "data")
    campaign = store.get("real")
    result = evaluation["result"]
    assert campaign.systems == ["base", "trained", "random"]
    assert [(item.prompt_index, item.prompt, item.seed) for item in campaign.items] == [
        (p["index"], p["caption"], 1) for p in result["prompts"]]
    for video in result["videos"]:
        item = next(k for k, it in enumerate(campaign.items) if it.prompt_index == video["prompt"])
        copied = store.video_file("real", store.video_tokens("real")[(video["system"], item)])
        assert copied.read_bytes() == (evaluation["out"] / video["path"]).read_bytes()
    assert set(campaign.metric_directions) == METRICS and campaign.metric_directions["heldout_loss"] is False
    with TestClient(Starlette(routes=campaign_routes(store))) as client:
        while (pair := client.get("/campaigns/real/pair", params={"rater": "ana"}).json())["pair_id"] is not None:
            shown = store.pair("real", pair["pair_id"])
            choice = "left" if ["trained", "random", "base"].index(shown.left) < ["trained", "random", "base"].index(shown.right) else "right"
            assert client.post("/campaigns/real/ratings", json={"pair_id": pair["pair_id"], "rater": "ana",
                                                                "verdicts": {"overall": choice}}).status_code == 201
        board = client.get("/campaigns/real/leaderboard").json()["criteria"]["overall"]
    assert board["ratings"] == 3 * 2 and [s["system"] for s in board["standings"]] == ["trained", "random", "base"]
    assert set(board["metrics"]) == METRICS
    assert {m: board["metrics"][m]["scored"] for m in ("heldout_loss", "fvd_i3d")} == {"heldout_loss": "per system",
                                                                                         "fvd_i3d": "per system"}
    for metric, report in board["metrics"].items():
        by_system = {s: result["systems"][s]["metrics"][metric] for s in campaign.systems}
        if len(set(by_system.values())) == 3:  # the tau of a metric with no tie, from its values by hand
            higher = result["metric_definitions"][metric]["higher_is_better"]
            order = sorted(by_system, key=by_system.get, reverse=higher)
            concordant = sum(1 for i in range(3) for j in range(i + 1, 3)
                             if ["trained", "random", "base"].index(order[i]) < ["trained", "random", "base"].index(order[j]))
            assert report["kendall_tau"] == pytest.approx((concordant - (3 - concordant)) / 3), metric
    assert board["metric_summary"]


def test_a_rerun_after_ctrl_c_makes_only_the_videos_not_made_yet(evaluation, tiny_cache_dir, demo_dataset, tmp_path,
                                                                   monkeypatch, capsys):
    """Guards `slapgen eval` making every video again after a Ctrl-C (hours of GPU time on a real model), and the
    other side of keeping videos: a rerun taking a video made from another adapter for this eval's. The fixture's
    eval (base, trained, random; 2 prompts; 1 seed) is run again into a new folder, stopped by a Ctrl-C as its 4th
    video starts; the same command then measures no held-out loss again, makes only the 3 videos not made yet, leaves
    the 3 made untouched, and every video decodes to the uninterrupted run's frames, with its per-video scores and
    held-out losses. Run again with another LoRA file under the name `random`, only random's losses and 2 videos
    are measured and made again."""
    from slapgen.engine.generator import VideoGenerator
    from trainer.evaluate.names import FLICKER, SUBJECT

    real = VideoGenerator.generate_frames
    made: list[tuple[str | None, str, int]] = []
    stop_at = [3]  # the count of videos after which a Ctrl-C comes (None: none)

    def counting(self, params, on_step=None, **kwargs):
        if len(made) == stop_at[0]:
            raise KeyboardInterrupt
        made.append((params.adapter, params.prompt, params.seed))
        return real(self, params, on_step, **kwargs)

    monkeypatch.setattr(VideoGenerator, "generate_frames", counting)
    out = tmp_path / "out"

    def command(random: Path) -> list[str]:
        return ["eval", "--model", "tiny", "--adapter", f"trained={evaluation['run']}", "--adapter", f"random={random}",
                "--heldout", str(demo_dataset), "--out", str(out), "--max-clips", "2", "--seeds", "1", "--device", "cpu",
                "--metrics", "loss,temporal", "--cache", str(evaluation["out"] / "cache"),
                *[f"--set={s}" for s in SETTINGS]]

    assert cli_main(command(evaluation["lora"])) == 130
    expected = evaluation["result"]
    planned = [(video["system"], video["prompt"]) for video in expected["videos"]]  # one process's order
    first = {out / video["path"]: (out / video["path"]).stat().st_mtime_ns for video in expected["videos"][:3]}
    assert len(made) == 3 and all(path.is_file() for path in first)
    capsys.readouterr()

    made.clear()
    stop_at[0] = None
    assert cli_main(command(evaluation["lora"])) == 0, capsys.readouterr().err[-3000:]
    captions = [prompt["caption"] for prompt in expected["prompts"]]
    assert [(adapter or "base", captions.index(text)) for adapter, text, _ in made] == planned[3:]
    assert {path: path.stat().st_mtime_ns for path in first} == first  # kept, not made again
    result = json.loads((out / "eval.json").read_text())
    assert (result["engine"]["videos_kept"], result["engine"]["losses_kept"]) == (3, 3)  # losses come before videos
    # Time per video over the videos this run made (3), none per held-out clip (no loss measured in this run).
    assert result["seconds_per_video"]["generate"] == pytest.approx(result["timing_s"]["generate"] / 3)
    assert "heldout_loss_per_clip" not in result["seconds_per_video"]
    said = capsys.readouterr().out
    assert f"eval: keeping 3 of 6 videos an earlier run made in {out / 'videos'}" in said
    assert f"eval: keeping the held-out losses of 3 of 3 systems an earlier run measured in {out / 'heldout_losses'}" in said
    for mine, theirs in zip(result["videos"], expected["videos"], strict=True):
        assert (mine["system"], mine["prompt"], mine["path"]) == (theirs["system"], theirs["prompt"], theirs["path"])
        assert np.array_equal(read_mp4(out / mine["path"])[0], read_mp4(evaluation["out"] / theirs["path"])[0])
        assert (mine[SUBJECT], mine[FLICKER]) == (theirs[SUBJECT], theirs[FLICKER])
    assert [p["heldout_loss"] for p in result["prompts"]] == [p["heldout_loss"] for p in expected["prompts"]]

    retrained = write_test_adapter(tmp_path / "retrained", tiny_cache_dir, rank=8, seed=4)
    made.clear()
    assert cli_main(command(retrained)) == 0, capsys.readouterr().err[-3000:]
    assert [adapter for adapter, _, _ in made] == ["random", "random"]
    assert (f"eval: making again 2 videos an earlier run left in {out / 'videos'}; the first, random/p000-s1.mp4: its "
            "recipe differs in adapter_sha256") in capsys.readouterr().out
    engine = json.loads((out / "eval.json").read_text())["engine"]
    assert (engine["videos_kept"], engine["losses_kept"]) == (4, 2)  # random's losses measured again too


def test_ctrl_c_of_eval_says_the_finished_videos_are_kept(monkeypatch, tmp_path, capsys):
    """Guards a Ctrl-C of `slapgen eval` saying only "finished work is kept (re-run)" or promising what a
    rerun does not do: its advice names what a rerun keeps (the latent cache and the finished videos)."""
    import trainer.evaluate.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.evaluate.run, "run_eval", interrupted)
    assert cli_main(["eval", "--model", "tiny", "--heldout", str(tmp_path), "--out", str(tmp_path / "out")]) == 130
    assert cli_stderr(capsys.readouterr().err) == ("slapgen eval: interrupted; finished work is kept (rerun the same "
                                                   "command: the held-out latent cache, the held-out losses measured "
                                                   "and every finished video are kept, and only what is missing is "
                                                   "measured or generated)")


def test_ctrl_c_line_starts_a_line_of_its_own_under_an_open_bar(monkeypatch, tmp_path, capsys):
    """Guards the Ctrl-C line printed with a plain print while the interrupted bar is still on the screen: it
    was glued onto the end of the bar's line ("... system=smoke@2]slapgen eval: interrupted; ...")."""
    import re

    from tqdm import tqdm

    import trainer.evaluate.run

    def interrupted_mid_bar(*args, **kwargs):
        bar = tqdm(total=64, desc="generate", file=sys.stderr)
        bar.update(24)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.evaluate.run, "run_eval", interrupted_mid_bar)
    assert cli_main(["eval", "--model", "tiny", "--heldout", str(tmp_path), "--out", str(tmp_path / "out")]) == 130
    segments = re.split(r"[\r\n]", capsys.readouterr().err)
    line = [segment for segment in segments if "interrupted" in segment]
    assert line and all(segment.startswith("slapgen eval: interrupted; finished work is kept") for segment in line)


def test_held_out_clips_left_out_are_counted_with_the_length_they_missed(tiny_cache_dir, demo_dataset, tmp_path, capsys):
    """Guards an evaluation silently using fewer held-out clips than given (a walk-through's eval used 62 of 101:
    FVD reads 17 frames, and every shorter clip was left out, each in a line of its own among the progress bars):
    one line says how many are used of how many, and why the others are not, with the length a clip must have."""
    from slapgen.video import write_mp4

    heldout = tmp_path / "heldout"
    shutil.copytree(demo_dataset, heldout)
    write_mp4(np.full((5, 32, 48, 3), 0.5), heldout / "short.mp4", fps=8)  # 0.5 s of 8 fps
    (heldout / "short.txt").write_text("a power slap, too short to score")
    (heldout / "zz_damaged.mp4").write_bytes(b"not a video")
    (heldout / "zz_damaged.txt").write_text("a damaged clip")
    data = DataConfig(height=32, width=48, num_frames=17, fps=8)
    entries = heldout_entries(heldout, resolve_model("tiny", tiny_cache_dir), data, tmp_path / "cache", progress=False)
    assert len(entries) == 4
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"4 of 6 held-out clips of {heldout} are used; 2 are left out: 1 corrupt, 1 too_short (under the 2.00 s each "
        "clip is read as: 17 frames at 8 fps)")
