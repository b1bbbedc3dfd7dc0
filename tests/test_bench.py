"""The benchmark scripts run (CPU paths, one step each); their numbers are not checked here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, offline_env

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "script, case, keys",
    [
        ("train_step.py", "tiny:cached", {"step_s_median", "peak_memory_mb"}),
        ("serve.py", "tiny:bf16-eager", {"step_s_median", "est_50_steps_s"}),  # the 5B step code on the tiny model
    ],
)
def test_bench_case_runs_and_reports(script, case, keys, tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), "--case", case, "--steps", "1"],
                            cwd=REPO_ROOT, env=offline_env(tmp_path, HOME=str(tmp_path)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert keys <= set(row) and all(row[k] > 0 for k in keys)


def test_the_benches_take_from_the_tests_only_what_needs_no_pytest(tmp_path):
    """Guards bench/coldstart.py stopping at once, after README's install, with "a start failed or ran out of
    time: ModuleNotFoundError: No module named 'pytest'" (it imported start_server from tests/conftest.py): every
    bench script takes servers and adapters from tests/harness.py only, which imports with pytest unimportable,
    and coldstart's --help runs so too (its import of the harness is at the top)."""
    import re

    taken = {(path.name, module) for path in (REPO_ROOT / "bench").rglob("*.py")
             for module in re.findall(r"^\s*(?:from|import) (tests(?:\.\w+)?)", path.read_text(), re.MULTILINE)}
    assert taken and {module for _, module in taken} == {"tests.harness"}, sorted(taken)
    blocked = ("import runpy, sys; sys.modules['pytest'] = None; import tests.harness; "
               "sys.argv = ['coldstart.py', '--help']; runpy.run_path('bench/coldstart.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=REPO_ROOT, env=offline_env(tmp_path, PYTHONPATH=str(REPO_ROOT)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


def test_attention_and_cache_cases_report_every_option(tmp_path):
    """Guards the GPU run's attention and cache checks crashing on one option or leaving one out: on the tiny
    model every SLAP_ATTENTION kernel is measured or answers its one start-up sentence (on a CPU: sdpa, flash
    and math run), and every SLAP_CACHE value is measured with the modules it hooks."""
    def run(case, *args):
        result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "serve.py"), "--case", case, *args],
                                cwd=REPO_ROOT, env=offline_env(tmp_path, HOME=str(tmp_path)), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    kernels = {row["attention"]: row for row in run("attention-tiny:bf16-eager", "--steps", "1")["kernels"]}
    assert list(kernels) == ["sdpa", "flash", "efficient", "cudnn", "math", "sage", "fa3", "fp8"]
    for name, row in kernels.items():
        assert row.get("step_s_median", 0) > 0 or row.get("unavailable", "").startswith(f"SLAP_ATTENTION={name} cannot run")
    if not __import__("torch").cuda.is_available():
        assert {name for name, row in kernels.items() if "step_s_median" in row} == {"sdpa", "flash", "math"}
    caches = run("caches-tiny:bf16-eager", "--loop-steps", "4")["caches"]
    assert [(row["cache"], row["hooked_modules"]) for row in caches] == [
        ("none", 0), ("pab", 2), ("fastercache", 2), ("fbc:0.05", 2), ("taylorseer", 4)]
    assert all(row["loop_s"] > 0 for row in caches) and caches[0]["latents_rel_diff_vs_none"] == 0


def test_a_run_never_overwrites_the_committed_results(tmp_path, monkeypatch):
    """Guards benchmark runs replacing bench/results/NAME-{cpu,gpu}.json (the committed numbers) unless asked to
    with --save, and a --save run that failed replacing them (a walk-through's coldstart run wrote rows: [] there)."""
    import bench.common as common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "RUNS_DIR", tmp_path / "results" / "runs")
    committed = common.write_results("demo", {"run": 1}, save=True)
    assert committed.parent == tmp_path / "results"
    new = common.write_results("demo", {"run": 2})
    assert new.parent == tmp_path / "results" / "runs" and new != committed
    assert json.loads(committed.read_text()) == {"run": 1} and json.loads(new.read_text()) == {"run": 2}
    # a --save run with a failed case (bench/serve.py, bench/train_step.py rows) or an error of its own: never saved
    for failed in ({"run": 3, "results": [{"case": "a", "step_s": 1.0}, {"case": "b", "error": "out of memory"}]},
                   {"run": 4, "rows": [], "error": "RuntimeError: not ready after 8 s"}):
        kept = common.write_results("demo", failed, save=True)
        assert kept.parent == tmp_path / "results" / "runs" and json.loads(kept.read_text()) == failed
    assert json.loads(committed.read_text()) == {"run": 1}


def test_slot_rank_bench_runs_and_writes_a_run_file(tmp_path):
    """The slot-rank benchmark end to end on one 5B-wide block (at a small clip size: a 480x720 step takes seconds
    here): a table, and JSON under runs/ only."""
    env = offline_env(tmp_path, HOME=str(tmp_path), SLAP_BENCH_RESULTS=str(tmp_path / "results"))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "slot_rank.py"), "--ranks", "0,16", "--rounds", "1",
                             "--size", "96x160"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [written] = list((tmp_path / "results" / "runs").glob("slot_rank-*.json"))
    rows = json.loads(written.read_text())["results"]
    assert [row["rank"] for row in rows] == [0, 16] and rows[0]["over_no_lora"] == 1.0
    assert rows[1]["full_lora_share_of_step"] > 0 and rows[1]["step_s_median"] > 0
    assert rows[0]["tokens"] == 6 * 10 + 226  # 96x160: 12x20 latents in 2x2 patches, 1 latent frame, 226 text tokens


def test_precompute_bench_on_two_short_clips(tmp_path):
    """The precompute benchmark end to end at the tiny model's size: both loops encode every clip, the table lands
    under runs/ and its temp folder of clips is gone."""
    env = offline_env(tmp_path, HOME=str(tmp_path), SLAP_BENCH_RESULTS=str(tmp_path / "results"),
                      TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "precompute.py"), "--clips", "2", "--seconds",
                             "1.5", "--height", "64", "--width", "96", "--frames", "9"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [written] = list((tmp_path / "results" / "runs").glob("precompute-*.json"))
    rows = {row["case"]: row for row in json.loads(written.read_text())["results"]}
    assert set(rows) == {"one by one", "read ahead", "decode alone"}
    assert all(row["clips"] == 2 and row["seconds"] > 0 for row in rows.values())
    assert not list((tmp_path / "tmp").glob("slapgen-bench-precompute-*"))


def test_duplicates_bench_on_one_bout(tmp_path):
    """The duplicates benchmark end to end on one bout (its 9 transformed copies and 2 hard negatives):
    the table lands under runs/, every copy is found, and no relation is wrong."""
    env = offline_env(tmp_path, HOME=str(tmp_path), SLAP_BENCH_RESULTS=str(tmp_path / "results"))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "duplicates.py"), "--bases", "1", "--scale", "0",
                             "--workers", "1", "--set-dir", str(tmp_path / "set")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [written] = list((tmp_path / "results" / "runs").glob("duplicates-*.json"))
    rows = {row["transformation"]: row for row in json.loads(written.read_text())["results"]}
    assert rows["all"]["clips"] == 12 and rows["all"]["recall"] == 1.0 and rows["all"]["false_matches"] == 0
    assert all(row["recall"] == 1.0 for name, row in rows.items() if "recall" in row)


def test_separation_bench_runs_and_reports(tmp_path):
    """Guards bench/separation.py's case protocol: a small campaign of a strong preference reports its share
    separated and the ratings it took, within what it was allowed (the rule itself is tested in test_ranking.py)."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "separation.py"), "--case", "0.9",
                             "--runs", "2", "--max-ratings", "150"],
                            cwd=REPO_ROOT, env=offline_env(tmp_path, HOME=str(tmp_path)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["preference"] == 0.9 and row["runs"] == 2 and 0 <= row["separated_share"] <= 1
    assert row["median_ratings"] is None or 8 <= row["median_ratings"] <= 150


def test_campaign_bench_runs_and_reports(tmp_path):
    """Guards bench/campaign.py's case protocol: a tiny adaptive campaign run reports tau shares per
    checkpoint (numbers not checked; the statistics are tested in test_ranking.py)."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "campaign.py"), "--case", "adaptive",
                             "--runs", "2", "--max-ratings", "40", "--every", "20"],
                            cwd=REPO_ROOT, env=offline_env(tmp_path, HOME=str(tmp_path)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["checkpoints"] == [20, 40] and all(0 <= share <= 1 for share in row["share_tau_ge_0.9"])
