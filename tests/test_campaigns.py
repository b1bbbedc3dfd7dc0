"""Rating campaigns (issue 20): the store, `slapgen campaign create` from eval folders, the HTTP routes
in process, and a simulated rater with known preferences through a real `bentoml serve`."""

from __future__ import annotations

import csv
import io
import json
import threading
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from slapgen.errors import CampaignConflictError, CampaignError, CampaignNotFoundError, CampaignRatedError
from slapgen.serving.campaign_routes import campaign_routes
from slapgen.campaign_store import CampaignStore, DeletedCampaign
from slapgen.video import read_mp4, write_mp4
from slapgen.evaluation.ranking import MIN_SEPARATION_PROMPTS
from trainer.campaign import comparable_metrics, plan_campaign
from trainer.cli import main

CAPTIONS = ["a slap lands on the cheek", "=HYPERLINK(\"x\") the striker winds up", "the defender's head snaps sideways",
            "a foul: the palm hits the ear", "the referee steps in", "the striker resets his stance"]


def write_eval_dir(folder: Path, systems: list[str], prompts: int = 3, seeds: tuple[int, ...] = (0, 1),
                   scores: dict[str, dict[str, float]] | None = None, skip: set[tuple[str, int, int]] = frozenset(),
                   definitions: dict[str, dict] | None = None, per_system: tuple[str, ...] = (),
                   adapters: dict[str, str] | None = None) -> Path:
    """A folder shaped as `slapgen eval` writes it (trainer/evaluate/run.py `assemble`): eval.json and
    videos/SYSTEM/pNNN-sSEED.mp4, real mp4s; `scores[metric][system]` is each system's per-video score
    (plus the prompt index / 100, so videos differ), and its mean the system's; a metric in `per_system`
    (held-out loss, FVD) has the system's number only. `definitions[metric]` adds to its definition;
    `adapters[system]`: its LoRA file as eval.json names it (else None, the base model's)."""
    scores = scores or {}
    definitions = definitions or {}
    videos = []
    for system in systems:
        for p in range(prompts):
            for seed in seeds:
                if (system, p, seed) in skip:
                    continue
                path = folder / "videos" / system / f"p{p:03d}-s{seed}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                shade = (hash((system, p, seed)) % 200) / 255
                write_mp4(np.full((4, 16, 16, 3), shade, dtype=np.float32), path, fps=8)
                videos.append({"system": system, "prompt": p, "seed": seed, "path": str(path.relative_to(folder)),
                               **{metric: by_system[system] + p / 100 for metric, by_system in scores.items()
                                  if metric not in per_system}})
    result = {
        "format": 1, "model": "tiny", "seeds": list(seeds),
        "metric_definitions": {metric: {"higher_is_better": not metric.endswith("loss"), **definitions.get(metric, {})}
                               for metric in scores},
        "systems": {s: {"adapter": (adapters or {}).get(s), "metrics": {m: by_system[s] + (prompts - 1) / 200 for m, by_system in scores.items()}}
                    for s in systems},
        "prompts": [{"index": p, "video": f"clip{p}.mp4", "caption": CAPTIONS[p]} for p in range(prompts)],
        "videos": videos,
    }
    (folder / "eval.json").write_text(json.dumps(result))
    return folder


@pytest.fixture
def eval_dir(tmp_path) -> Path:
    return write_eval_dir(tmp_path / "eval", ["base", "lora_a", "lora_b"],
                          scores={"clip_score": {"base": 0.1, "lora_a": 0.3, "lora_b": 0.2}})


def nothing_stored(data_dir: Path, name: str, database: str | None = None) -> bool:
    """No row and no video folder (staged or final) of campaign `name` (read through a store on the same
    database, so on SQLite and PostgreSQL alike)."""
    store = CampaignStore(data_dir, database)
    leftovers = list(store.videos_dir.iterdir())
    return not store.exists(name) and not store.video_tokens(name) and not leftovers


# -- the store -----------------------------------------------------------------------------------------


def test_store_creates_a_campaign_with_copied_videos_and_answers_each_pair_once(tmp_path, eval_dir, database_url):
    """A campaign's videos are copies inside the data dir under random tokens; a pair answered twice is
    a conflict, by another rater or with unknown / missing criteria an error, and nothing is stored then."""
    store = CampaignStore(tmp_path / "data", database_url)
    campaign = store.create(plan_campaign("c1", [eval_dir], criteria=["overall", "motion"]))
    assert campaign.systems == ["base", "lora_a", "lora_b"] and len(campaign.items) == 6
    assert campaign.budget == 3 * 6  # every pair once on every item
    tokens = store.video_tokens("c1")
    assert len(tokens) == 18
    original = eval_dir / "videos" / "lora_a" / "p001-s1.mp4"
    copied = store.video_file("c1", tokens[("lora_a", 3)])  # items sorted by (prompt, caption, seed): 3 = p1 s1
    assert copied.read_bytes() == original.read_bytes() and copied.is_relative_to(tmp_path / "data" / "campaigns" / "c1")
    assert "lora_a" not in copied.name
    with pytest.raises(CampaignNotFoundError):
        store.video_file("c1", "../../campaigns.sqlite")

    pair = store.issue_pair("c1", "ana", "base", "lora_a", 0, repeat=False)
    with pytest.raises(CampaignError, match="another rater"):
        store.answer("c1", pair.pair_id, "ben", {"overall": "left", "motion": "tie"})
    with pytest.raises(CampaignError, match="not colour"):
        store.answer("c1", pair.pair_id, "ana", {"overall": "left", "colour": "tie"})
    with pytest.raises(CampaignError, match="missing: motion"):
        store.answer("c1", pair.pair_id, "ana", {"overall": "left"})
    assert store.verdicts("c1") == []
    ids = store.answer("c1", pair.pair_id, "ana", {"overall": "left", "motion": "tie"})
    assert len(ids) == 2
    with pytest.raises(CampaignConflictError, match="answered already"):
        store.answer("c1", pair.pair_id, "ana", {"overall": "right", "motion": "right"})
    rows = store.verdicts("c1")
    assert [(r["criterion"], r["choice"], r["preferred"], r["rater"]) for r in rows] == [
        ("overall", "left", "base", "ana"), ("motion", "tie", "tie", "ana")]
    assert store.overview() == [{"name": "c1", "created_at": campaign.created_at, "systems": 3, "items": 6,
                             "criteria": ["overall", "motion"], "ratings": 1, "budget": 18, "raters": 1}]


def test_a_failed_create_leaves_nothing(tmp_path, eval_dir, database_url):
    """Atomic create: a video that vanishes between planning and copying fails the create, and neither
    rows nor a folder (staged or final) remain; the name is still free afterwards."""
    store = CampaignStore(tmp_path / "data", database_url)
    spec = plan_campaign("c2", [eval_dir])
    (eval_dir / "videos" / "lora_b" / "p002-s1.mp4").unlink()
    with pytest.raises(FileNotFoundError):
        store.create(spec)
    assert nothing_stored(tmp_path / "data", "c2", database_url)
    write_eval_dir(eval_dir, ["base", "lora_a", "lora_b"])
    store.create(plan_campaign("c2", [eval_dir]))
    with pytest.raises(CampaignConflictError, match="exists already"):
        store.create(plan_campaign("c2", [eval_dir]))


def test_verdict_export_makes_formula_cells_inert(tmp_path, eval_dir):
    """CSV export as the studio's: a prompt or rater starting like a formula gets a leading apostrophe; guards
    `created_at` exported as seconds since the epoch, which a spreadsheet shows as a bare number."""
    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("c3", [eval_dir]))
    pair = store.issue_pair("c3", "=cmd|' /C calc'!A0", "lora_b", "base", 2, repeat=False)  # item 2: prompt 1
    store.answer("c3", pair.pair_id, "=cmd|' /C calc'!A0", {"overall": "right"})
    row = next(csv.DictReader(io.StringIO(store.verdicts_csv("c3"))))
    assert row["rater"] == "'=cmd|' /C calc'!A0" and row["prompt"] == "'" + CAPTIONS[1]
    assert (row["choice"], row["preferred"], row["left_system"], row["right_system"]) == ("right", "base", "lora_b", "base")
    # The moment in ISO 8601, UTC, as the jobs API gives it (it was seconds since the epoch, a spreadsheet's number).
    stored = store.verdicts("c3")[0]["created_at"]
    assert datetime.fromisoformat(row["created_at"]) == datetime.fromtimestamp(stored, timezone.utc)
    assert row["created_at"].endswith("+00:00")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_delete_removes_a_campaign_whole_or_not_at_all(tmp_path, eval_dir, database_url):
    """Guards campaigns that could not be deleted (a test or misspelt one stayed in the studio's list for good),
    and a delete that leaves part of one behind: delete removes the campaign's row, videos, pairs and verdicts
    and its copied videos, and nothing of another campaign; it keeps a campaign with ratings unless told they
    go too; a failure inside it (as a crash before its commit) leaves the campaign whole; an unknown name is
    refused. Afterwards the name is free, and a new campaign of that name starts with no pair or verdict."""
    from sqlalchemy import event

    data = tmp_path / "data"
    store = CampaignStore(data, database_url)
    store.create(plan_campaign("gone", [eval_dir], criteria=["overall", "motion"]))
    store.create(plan_campaign("kept", [eval_dir]))
    answered = store.issue_pair("gone", "ana", "base", "lora_a", 0, repeat=False)
    store.answer("gone", answered.pair_id, "ana", {"overall": "left", "motion": "tie"})
    store.issue_pair("gone", "ben", "lora_a", "lora_b", 1, repeat=False)  # issued, not answered
    kept_pair = store.issue_pair("kept", "ana", "base", "lora_b", 2, repeat=False)
    store.answer("kept", kept_pair.pair_id, "ana", {"overall": "right"})
    kept_before = (store.get("kept"), store.video_tokens("kept"), store.verdicts("kept"), _files(data / "campaigns" / "kept"))
    gone_before = (store.get("gone"), store.video_tokens("gone"), store.verdicts("gone"), _files(data / "campaigns" / "gone"))

    def whole() -> bool:
        return (store.get("gone"), store.video_tokens("gone"), store.verdicts("gone"),
                _files(data / "campaigns" / "gone")) == gone_before and store.open_pair("gone", "ben") is not None

    with pytest.raises(CampaignRatedError, match="campaign gone has 1 rating from 1 rater, which deleting it loses") as refused:
        store.delete("gone")
    assert (refused.value.ratings, refused.value.raters) == (1, 1)
    assert whole()

    def crash(_connection, _cursor, statement, *_args):
        if statement.startswith("DELETE FROM videos"):  # the last statement before the commit
            raise RuntimeError("killed")

    event.listen(store._engine, "before_cursor_execute", crash)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            store.delete("gone", with_ratings=True)
    finally:
        event.remove(store._engine, "before_cursor_execute", crash)
    assert whole()

    assert store.delete("gone", with_ratings=True) == DeletedCampaign("gone", videos=18, pairs=2, ratings=1, raters=1)
    assert [entry["name"] for entry in store.overview()] == ["kept"]
    assert sorted(path.name for path in (data / "campaigns").iterdir()) == ["kept"]  # no folder, staged or hidden
    assert (store.get("kept"), store.video_tokens("kept"), store.verdicts("kept"),
            _files(data / "campaigns" / "kept")) == kept_before
    with pytest.raises(CampaignNotFoundError, match="no campaign named 'gone'"):
        store.delete("gone")

    store.create(plan_campaign("gone", [eval_dir], criteria=["overall", "motion"]))
    assert store.verdicts("gone") == [] and store.open_pair("gone", "ben") is None
    assert store.overview()[0]["ratings"] == 0


# -- slapgen campaign create ---------------------------------------------------------------------------


def run_cli(monkeypatch, tmp_path, *args) -> int:
    monkeypatch.setenv("SLAP_DATA_DIR", str(tmp_path / "data"))
    return main(["campaign", "create", *args])


def test_cli_creates_a_campaign_from_two_eval_folders(monkeypatch, tmp_path, capsys):
    """Two sweep runs' eval folders (both name their adapter `lora`) become systems RUN-lora; --systems
    picks; the scores of eval.json travel with the campaign."""
    run1 = write_eval_dir(tmp_path / "runs" / "r1" / "eval", ["lora"], scores={"clip_score": {"lora": 0.5}})
    run2 = write_eval_dir(tmp_path / "runs" / "r2" / "eval", ["lora"], scores={"clip_score": {"lora": 0.7}})
    base = write_eval_dir(tmp_path / "base" / "eval", ["base"], scores={"clip_score": {"base": 0.1}})
    assert run_cli(monkeypatch, tmp_path, "sw", "--from", str(run1), "--from", str(run2), "--from", str(base),
                   "--systems", "r1-lora,r2-lora", "--criteria", "overall,motion", "--budget", "40") == 0
    out = capsys.readouterr().out
    assert "campaign sw: 2 systems (r1-lora, r2-lora), 6 prompt/seed items" in out
    # A budget past what one rater can give (1 pair x 6 items) says how many raters it needs: ceil(40 / 6)
    assert ("note: one rater can give at most 6 ratings here (every pair of systems on every prompt/seed item once): "
            "a budget of 40 needs 7 raters or more") in out
    # ... and the next step names the store the service must open (SLAP_DATA_DIR: run_cli's data folder)
    assert (f"next: serve with SLAP_DATA_DIR={(tmp_path / 'data').absolute()} (`bentoml serve`); raters open /studio/ "
            "and choose Campaigns; the results: GET /campaigns/sw/leaderboard") in out
    campaign = CampaignStore(tmp_path / "data").get("sw")
    assert campaign.systems == ["r1-lora", "r2-lora"] and campaign.criteria == ["overall", "motion"]
    assert campaign.budget == 40
    assert campaign.system_scores == {"r1-lora": {"clip_score": 0.51}, "r2-lora": {"clip_score": 0.71}}
    assert campaign.video_scores["clip_score"][("r2-lora", 5)] == pytest.approx(0.72)  # item 5: prompt 2, seed 1
    assert campaign.metric_directions == {"clip_score": True}


@pytest.mark.parametrize("args, message", [
    (["Bad Name"], "campaign name 'Bad Name' must be 1-64 characters"),
    (["ok", "--systems", "base,nope"], "--systems names nope, not among the folders' systems"),
    (["ok", "--systems", "base"], "a campaign needs at least two systems"),
    (["ok", "--systems", "base,lora_a,base"], "--systems names base twice; name each system once"),
    (["ok", "--criteria", "overall,Motion!"], "criterion 'Motion!' must be"),
    (["ok", "--budget", "0"], "--budget must be at least 1"),
])
def test_cli_refuses_bad_input_in_one_sentence_and_stores_nothing(monkeypatch, tmp_path, capsys, eval_dir, args, message):
    """Bad names, systems, criteria and budgets end with one line on stderr, status 2, nothing stored."""
    assert run_cli(monkeypatch, tmp_path, *args, "--from", str(eval_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert nothing_stored(tmp_path / "data", "ok")


def test_cli_names_the_missing_videos_and_refuses_a_taken_name(monkeypatch, tmp_path, capsys):
    """Same prompts and seeds across systems are required: the error says which system lacks which;
    a folder without eval.json (a sweep's says whether it has generation metrics, read from its sweep.json as the
    sweep reads it; a damaged one says so) and an existing campaign name are one-line errors too."""
    partial = write_eval_dir(tmp_path / "partial", ["base", "lora"], skip={("lora", 1, 0), ("lora", 2, 1)})
    assert run_cli(monkeypatch, tmp_path, "c", "--from", str(partial)) == 2
    assert "missing lora lacks prompt 1 seed 0, prompt 2 seed 1" in capsys.readouterr().err
    assert nothing_stored(tmp_path / "data", "c")
    assert run_cli(monkeypatch, tmp_path, "c", "--from", str(tmp_path)) == 2
    assert "holds no eval.json" in capsys.readouterr().err
    assert run_cli(monkeypatch, tmp_path, "c", "--from", str(tmp_path / "evla")) == 2  # a typo: said as that
    assert f"slapgen campaign: {tmp_path / 'evla'} is not a folder (no such path): --from takes" in capsys.readouterr().err
    # A sweep without generation metrics (held-out loss only) read as a wrong folder (a walk-through's find); its
    # sweep.json as `slapgen sweep` writes it
    from trainer.sweep.evaluate import EvalSettings
    from trainer.sweep.folder import DEFINITION_FILE, SweepDefinition, write_definition
    from trainer.sweep.grid import parse_axis, plan_runs

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    axes = (parse_axis("lora.rank=2,4"),)
    runs = tuple(plan_runs("tiny-smoke", [], list(axes), sweep / "cache", resolve_models=False))
    write_definition(sweep, SweepDefinition("tiny-smoke", (), axes, "data", "heldout", ("loss",), True, runs))
    assert run_cli(monkeypatch, tmp_path, "c", "--from", str(sweep)) == 2
    assert f"slapgen campaign: {sweep} is a sweep that made no videos to rate (no generation metrics" \
        in capsys.readouterr().err
    # ... and one with them, not finished yet: its rerun makes the videos (the review's find: it was told to sweep
    # again into a new folder, leaving its runs)
    write_definition(sweep, SweepDefinition("tiny-smoke", (), axes, "data", "heldout", ("loss", "temporal"), True, runs,
                                            EvalSettings(seeds=(0,))))
    assert run_cli(monkeypatch, tmp_path, "c", "--from", str(sweep)) == 2
    assert f"slapgen campaign: {sweep} is a sweep whose videos are not all made yet" in capsys.readouterr().err
    # ... and a sweep.json this slapgen cannot read (damaged, or run configs it refuses, which its rerun refuses too):
    # what is wrong with it, not "no eval.json" nor "rerun it"
    for damaged, why in (('{"metrics": ["loss", "clip"', "JSONDecodeError"), ('{"metrics": ["loss", "clip"]}', "KeyError")):
        (sweep / DEFINITION_FILE).write_text(damaged)
        assert run_cli(monkeypatch, tmp_path, "c", "--from", str(sweep)) == 2
        assert f"slapgen campaign: {sweep / DEFINITION_FILE} is not a readable sweep definition ({why})" \
            in capsys.readouterr().err
    whole = write_eval_dir(tmp_path / "whole", ["base", "lora"])
    assert run_cli(monkeypatch, tmp_path, "c", "--from", str(whole)) == 0
    assert run_cli(monkeypatch, tmp_path, "c", "--from", str(whole)) == 2
    assert "campaign c exists already" in capsys.readouterr().err


@pytest.mark.slow
def test_create_warns_when_the_database_is_shared_and_the_videos_are_not(monkeypatch, tmp_path, capsys, eval_dir,
                                                                     postgres_url):
    """Guards a walk-through's campaign that nobody could rate: made with the replicas' SLAP_DATABASE_URL but
    without their SLAP_DATA_DIR, its rows went to the shared database and its videos to this machine's cache,
    and every pair's video was a 404 on the replicas; create named only the database. It now names where the
    videos went, and warns when that is the default folder while the database is shared."""
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SLAP_DATA_DIR", raising=False)
    monkeypatch.setenv("SLAP_DATABASE_URL", f"sqlite:///{tmp_path / 'local.sqlite'}")  # one machine's: no warning
    assert main(["campaign", "create", "local", "--from", str(eval_dir)]) == 0
    assert "warning" not in capsys.readouterr().out
    monkeypatch.setenv("SLAP_DATABASE_URL", postgres_url)
    assert main(["campaign", "create", "stray", "--from", str(eval_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    videos = tmp_path / "cache" / "data"
    assert printed[0].endswith(f"; its videos copied to {videos / 'campaigns' / 'stray'}")
    assert f"warning: SLAP_DATABASE_URL is set but SLAP_DATA_DIR is not, so the videos went to {videos}, this " \
           "machine's cache: replicas serve a campaign's videos from their SLAP_DATA_DIR" in "\n".join(printed)
    monkeypatch.setenv("SLAP_DATA_DIR", str(tmp_path / "shared-data"))
    assert main(["campaign", "create", "placed", "--from", str(eval_dir)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_cli_lists_and_deletes_campaigns(monkeypatch, tmp_path, capsys, eval_dir, database_url):
    """Guards `slapgen campaign` having only `create`: `list` shows each campaign of the store create writes
    (SLAP_DATA_DIR, SLAP_DATABASE_URL) with its systems, ratings so far of its budget and raters, and creates
    no store where there is none; `delete NAME` removes one, asks for --yes when it has ratings (in one
    sentence, deleting nothing), and refuses an unknown name in one sentence. Each names the store it used, the
    SQLite file as an absolute path (a shell without the replicas' SLAP_DATABASE_URL wrote into a SQLite file no
    replica reads, and every line named only the data folder, as with the database)."""
    from slapgen.database import shown_url
    from slapgen.serving.settings import load_settings

    data = tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLAP_DATA_DIR", "data")  # relative, as a shell may set it
    monkeypatch.delenv("SLAP_DATABASE_URL", raising=False)
    sqlite_file = f"{data / 'campaigns.sqlite'} (SLAP_DATABASE_URL is unset)"
    assert main(["campaign", "list"]) == 0
    assert capsys.readouterr().out == f"no campaigns in {sqlite_file}\n"
    assert not data.exists()  # listing an empty store created none
    assert main(["campaign", "delete", "nope"]) == 2
    assert capsys.readouterr().err == (f"slapgen campaign: no campaign named 'nope' in {sqlite_file}; `slapgen campaign "
                                       "list` lists them\n")
    assert main(["campaign", "create", "local", "--from", str(eval_dir)]) == 0  # the URL forgotten in this shell
    created = capsys.readouterr().out.splitlines()
    assert created[0].endswith(f" ratings, in {sqlite_file}; its videos copied to {data / 'campaigns' / 'local'}")
    # eval_dir has 3 prompts: fewer than the leaderboard's separation needs, said once, here.
    assert created[1:] == [
        f"note: 3 prompts, and separation needs verdicts on at least {MIN_SEPARATION_PROMPTS}: the leaderboard can "
        "never call the top system separated from the second, so the campaign ends only on its budget of 18 ratings; "
        "eval on more held-out clips or --seeds for a campaign that can separate them",
        f"next: serve with SLAP_DATA_DIR={data} (`bentoml serve`); raters open /studio/ and choose Campaigns; the "
        "results: GET /campaigns/local/leaderboard"]
    assert main(["campaign", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"campaigns in {sqlite_file}:"
    assert main(["campaign", "delete", "local"]) == 0
    assert capsys.readouterr().out.startswith(f"deleted campaign local from {sqlite_file}: ")

    monkeypatch.setenv("SLAP_DATABASE_URL", database_url)
    assert main(["campaign", "create", "rated", "--from", str(eval_dir), "--budget", "5"]) == 0
    store_url = shown_url(load_settings().database_url)  # as the service names it (postgresql+psycopg://...)
    created = capsys.readouterr().out.splitlines()
    assert created[0].endswith(f" ratings, in {store_url}; its videos copied to {data / 'campaigns' / 'rated'}")
    # The videos are in this SLAP_DATA_DIR whatever the database: a server given only the URL listed the campaign
    # and answered 404 for every video
    assert created[-1].startswith(f"next: serve with SLAP_DATA_DIR={data} and the same SLAP_DATABASE_URL (`bentoml serve`);")
    assert main(["campaign", "create", "typo", "--from", str(eval_dir), "--systems", "base,lora_b"]) == 0
    store = CampaignStore(data, database_url)
    for rater, item in (("ana", 0), ("ben", 1), ("ana", 2)):
        pair = store.issue_pair("rated", rater, "base", "lora_a", item, repeat=False)
        store.answer("rated", pair.pair_id, rater, {"overall": "left"})
    capsys.readouterr()
    assert main(["campaign", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"campaigns in {store_url}:",
        "  rated: 3 systems (base, lora_a, lora_b), 3/5 ratings, 2 raters, criteria overall",
        "  typo: 2 systems (base, lora_b), 0/6 ratings, 0 raters, criteria overall",
    ]

    assert main(["campaign", "delete", "rated"]) == 2
    assert capsys.readouterr().err == ("slapgen campaign: campaign rated has 3 ratings from 2 raters, which deleting it "
                                       "loses; add --yes to delete it with them\n")
    assert len(store.verdicts("rated")) == 3
    assert main(["campaign", "delete", "typo"]) == 0
    assert capsys.readouterr().out == f"deleted campaign typo from {store_url}: 12 videos, 0 issued pairs, 0 ratings\n"
    assert main(["campaign", "delete", "rated", "--yes"]) == 0
    assert capsys.readouterr().out == (f"deleted campaign rated from {store_url}: 18 videos, 3 issued pairs, 3 ratings "
                                       "from 2 raters\n")
    assert main(["campaign", "list"]) == 0
    assert capsys.readouterr().out == f"no campaigns in {store_url}\n"
    assert nothing_stored(data, "rated", database_url) and nothing_stored(data, "typo", database_url)


# -- HTTP --------------------------------------------------------------------------------------------


def assert_error(response, status: int, fragment: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and fragment in body["error"], body


def check_errors(client, name: str, store: CampaignStore | None = None):
    """The 409, 400s and 404s of the campaign routes, in the one error shape. With `store`, the pair answered
    twice is issued through it (a campaign past its budget issues none)."""
    assert_error(client.get("/campaigns/nope/pair", params={"rater": "ana"}), 404, "no campaign named 'nope'")
    assert_error(client.get(f"/campaigns/{name}/pair"), 400, "rater is required")
    assert_error(client.get(f"/campaigns/{name}/pair", params={"rater": "  "}), 400, "at least 1 character")
    assert_error(client.get(f"/campaigns/{name}/videos/abc.mp4"), 404, "has no video 'abc'")
    assert_error(client.get("/campaigns/nope/leaderboard"), 404, "no campaign named")
    assert_error(client.get("/campaigns/nope/verdicts.csv"), 404, "no campaign named")
    pair = (client.get(f"/campaigns/{name}/pair", params={"rater": "err"}).json() if store is None else
            {"pair_id": store.issue_pair(name, "err", "base", "lora_a", 0, repeat=False).pair_id})
    post = lambda body: client.post(f"/campaigns/{name}/ratings", json=body)  # noqa: E731
    assert_error(post({"pair_id": "nope", "rater": "err", "verdicts": {"overall": "left"}}), 404, "has no pair 'nope'")
    assert_error(post({"pair_id": pair["pair_id"], "rater": "err", "verdicts": {"colour": "left"}}), 400,
                 "not colour")
    assert_error(post({"pair_id": pair["pair_id"], "rater": "err", "verdicts": {"overall": "best"}}), 400,
                 "verdicts.overall must be 'left', 'right' or 'tie', got \"best\"")
    assert_error(post({"pair_id": pair["pair_id"], "rater": "err"}), 400, "verdicts is required")
    # Guards pydantic's words reaching a rater: "must have at least 1 item after validation, not 0, got an object".
    assert_error(post({"pair_id": pair["pair_id"], "rater": "err", "verdicts": {}}), 400,
                 "verdicts must have at least 1 item, not 0")
    assert post({"pair_id": pair["pair_id"], "rater": "err", "verdicts": {"overall": "tie"}}).status_code == 201
    assert_error(post({"pair_id": pair["pair_id"], "rater": "err", "verdicts": {"overall": "left"}}), 409,
                 "answered already")


def test_routes_in_process_serve_blind_pairs_and_errors(tmp_path, eval_dir):
    """In process (TestClient): a pair names no system, its videos are the campaign's copies, asking
    again before answering gives the same pair, and the error statuses and shape hold."""
    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("web", [eval_dir]))
    with TestClient(Starlette(routes=campaign_routes(store))) as client:
        pair = client.get("/campaigns/web/pair", params={"rater": "ana"}).json()
        assert client.get("/campaigns/web/pair", params={"rater": "ana"}).json() == pair
        text = json.dumps(pair)
        assert not any(system in text for system in ("base", "lora_a", "lora_b"))
        assert set(pair) >= {"pair_id", "prompt", "seed", "left", "right", "criteria"}
        video = client.get(pair["left"]["video"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        check_errors(client, "web")
        listed = client.get("/campaigns").json()["campaigns"]
        assert [(c["name"], c["ratings"], c["raters"]) for c in listed] == [("web", 1, 1)]


# -- a simulated rater through a real server ------------------------------------------------------------

TRUE_STRENGTH = {"base": -1.5, "lora_a": 1.5, "lora_b": 0.0}  # log-strengths: lora_a > lora_b > base


def simulated_choice(pair_systems: tuple[str, str], rng: np.random.Generator) -> str:
    """Bradley-Terry with the true strengths: P(left preferred) = 1 / (1 + e^(s_right - s_left))."""
    left, right = pair_systems
    p_left = 1.0 / (1.0 + np.exp(TRUE_STRENGTH[right] - TRUE_STRENGTH[left]))
    return "left" if rng.random() < p_left else "right"


@pytest.mark.slow
def test_simulated_raters_rank_the_systems_through_a_real_server(tiny_server, tiny_cache_dir, monkeypatch, tmp_path):
    """End to end: `slapgen campaign create` writes the campaign into the server's data store, three
    simulated raters with known preferences answer blind pairs over HTTP until the leaderboard says done
    (or the budget), and the leaderboard ranks the systems in the simulated order; the automatic metric
    built to follow the truth is named as the one tracking the raters (agreement > 0.5, tau 1) and the
    reversed one gets tau -1. The verdicts export has every verdict with who and when."""
    # 6 prompts: a metric is called for or against the raters from MIN_SEPARATION_PROMPTS (5) on
    folder = write_eval_dir(tmp_path / "eval", ["base", "lora_a", "lora_b"], prompts=6, seeds=(0, 1), scores={
        "follows_truth": dict(TRUE_STRENGTH), "reversed": {s: -v for s, v in TRUE_STRENGTH.items()}})
    name = f"sim-{tmp_path.name[-20:].lower().replace('_', '-')}"
    monkeypatch.setenv("SLAP_DATA_DIR", str(tiny_cache_dir / "data"))  # what tiny_server reads
    assert main(["campaign", "create", name, "--from", str(folder), "--budget", "60"]) == 0
    store = CampaignStore(tiny_cache_dir / "data")  # only to know which systems a blind pair showed
    rng = np.random.default_rng(20)
    url = tiny_server.url
    with httpx.Client(base_url=url, timeout=60) as client:
        first = client.get(f"/campaigns/{name}/pair", params={"rater": "r0"}).json()
        frames, _ = read_mp4(_download(client, first["left"]["video"], tmp_path / "left.mp4"))
        assert frames.shape[1:3] == (16, 16)
        board = None
        for answered in range(200):
            rater = f"r{answered % 3}"
            pair = client.get(f"/campaigns/{name}/pair", params={"rater": rater}).json()
            if pair["pair_id"] is None:  # the budget is reached: no new pair
                board = client.get(f"/campaigns/{name}/leaderboard").json()["criteria"]["overall"]
                break
            shown = store.pair(name, pair["pair_id"])
            choice = simulated_choice((shown.left, shown.right), rng)
            response = client.post(f"/campaigns/{name}/ratings",
                                   json={"pair_id": pair["pair_id"], "rater": rater, "verdicts": {"overall": choice}})
            assert response.status_code == 201, response.text
            if answered % 10 == 9:
                board = client.get(f"/campaigns/{name}/leaderboard").json()["criteria"]["overall"]
                if board["done"]:
                    break
        assert board is not None and board["done"], board
        assert [s["system"] for s in board["standings"]] == ["lora_a", "lora_b", "base"]
        assert board["reason"] in ("separated", "budget") and board["why"]
        for standing in board["standings"]:
            assert standing["low"] <= standing["strength"] <= standing["high"]
        metrics = board["metrics"]
        assert metrics["follows_truth"]["kendall_tau"] == 1.0  # exactly: rounded to 12 digits (it read 0.9999999999999999)
        assert metrics["reversed"]["kendall_tau"] == pytest.approx(-1.0)
        follows = metrics["follows_truth"]["agreement"]
        assert follows["rate"] > 0.5 and follows["rate"] + metrics["reversed"]["agreement"]["rate"] == pytest.approx(1.0)
        assert board["metric_summary"].startswith("follows_truth ")
        if follows["low"] > 0.5:  # clearly better than chance: the leaderboard names it for --pick-by
            assert board["pick_by"] == "follows_truth" and board["metric_summary"].endswith("--pick-by follows_truth.")
        assert "inter_rater_alpha" in board and set(board["rater_consistency"]) <= {"r0", "r1", "r2"}
        exported = client.get(f"/campaigns/{name}/verdicts").json()["verdicts"]
        assert len(exported) == board["ratings"] + sum(c["repeats"] for c in board["rater_consistency"].values())
        assert all(row["rater"] in ("r0", "r1", "r2") and row["created_at"] > 0 for row in exported)
        listed = {c["name"]: c for c in client.get("/campaigns").json()["campaigns"]}
        assert listed[name]["ratings"] == board["ratings"]
        check_errors(client, name, store)


def _download(client: httpx.Client, path: str, target: Path) -> Path:
    response = client.get(path)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    target.write_bytes(response.content)
    return target


def test_leaderboard_with_a_metric_equal_for_every_system_is_valid_json(tmp_path):
    """Guards the 500 a real eval run's campaign gave: Kendall's tau of a metric equal for every system
    is NaN (scipy), which JSON cannot carry; it is null, and the metric's ties are counted apart."""
    folder = write_eval_dir(tmp_path / "eval", ["base", "lora"], scores={"flat": {"base": 0.5, "lora": 0.5}})
    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("flat", [folder]))
    with TestClient(Starlette(routes=campaign_routes(store))) as client:
        pair = client.get("/campaigns/flat/pair", params={"rater": "ana"}).json()
        client.post("/campaigns/flat/ratings", json={"pair_id": pair["pair_id"], "rater": "ana", "verdicts": {"overall": "left"}})
        response = client.get("/campaigns/flat/leaderboard")
    assert response.status_code == 200, response.text
    flat = response.json()["criteria"]["overall"]["metrics"]["flat"]
    assert flat["kendall_tau"] is None and flat["agreement"]["metric_ties"] == 1 and flat["agreement"]["rate"] is None
    # The route gives the leaderboard the campaign's prompts: 3 here, so only the budget can end it.
    assert response.json()["criteria"]["overall"]["why"].startswith(
        "not yet, and only the budget can end it: the campaign has 3 prompts")


def test_checkpoint_systems_keep_their_eval_names(tmp_path):
    """System names never reach a URL (videos go by token), so eval's `NAME@STEP` systems (issue 20's
    `--checkpoints`) are kept as they are; a name `--systems` could not hold (a comma) is refused."""
    folder = write_eval_dir(tmp_path / "eval", ["base", "lora@500"])
    assert plan_campaign("steps", [folder]).systems == ["base", "lora@500"]
    comma = write_eval_dir(tmp_path / "comma", ["base", "a,b"])
    with pytest.raises(CampaignError, match="without a comma"):
        plan_campaign("steps", [comma])


def test_concurrent_answers_to_one_pair_store_one(tmp_path, eval_dir, database_url):
    """The once-only answer holds across processes' connections, not only one store's lock: two stores
    on one data dir (two workers, or two replicas on one PostgreSQL) answering one pair at once store one set
    of verdicts; the others are a 409."""
    from concurrent.futures import ThreadPoolExecutor

    CampaignStore(tmp_path / "data", database_url).create(plan_campaign("race", [eval_dir]))
    stores = [CampaignStore(tmp_path / "data", database_url) for _ in range(8)]
    start = threading.Barrier(len(stores))
    pair = stores[0].issue_pair("race", "ana", "base", "lora_a", 1, repeat=False)

    def answer(store):
        start.wait()
        try:
            store.answer("race", pair.pair_id, "ana", {"overall": "left"})
            return "stored"
        except CampaignConflictError:
            return "conflict"

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(answer, stores))
    assert outcomes == ["conflict"] * 7 + ["stored"]
    assert len(stores[0].verdicts("race")) == 1


def test_api_document_has_the_campaign_routes_with_a_valid_example():
    """The fuzz (tests/test_api_fuzz.py) reaches only documented routes: every campaign route is in the
    document, and the ratings example passes the route's own body model."""
    from slapgen.serving.campaign_routes import CampaignVerdictRequest
    from slapgen.serving.openapi import CAMPAIGN_VERDICT_EXAMPLE, EXTRA_PATHS

    routes = {route.path for route in campaign_routes(CampaignStore.__new__(CampaignStore))}
    assert routes <= set(EXTRA_PATHS)
    body = EXTRA_PATHS["/campaigns/{name}/ratings"]["post"]["requestBody"]["content"]["application/json"]
    assert body["example"] == CAMPAIGN_VERDICT_EXAMPLE
    CampaignVerdictRequest.model_validate(CAMPAIGN_VERDICT_EXAMPLE)
    assert {"400", "404", "409"} <= set(EXTRA_PATHS["/campaigns/{name}/ratings"]["post"]["responses"])


def test_one_rater_asking_two_replicas_at_once_gets_one_pair(tmp_path, eval_dir, database_url, monkeypatch):
    """Guards a rater issued the same pair twice: two stores on one database (two replicas or workers)
    answering one rater's `GET /pair` at once both found no open pair (the check and the insert are
    separate transactions) and both issued one. Both requests are held until each has checked, then
    both get the same pair_id and the database holds one open pair for the rater."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    from slapgen.campaign_store import next_pair_for, pairs

    CampaignStore(tmp_path / "data", database_url).create(plan_campaign("race", [eval_dir]))
    stores = [CampaignStore(tmp_path / "data", database_url) for _ in range(2)]
    checked = threading.Barrier(len(stores))
    verdicts = CampaignStore.verdicts

    def after_both_checked(self, name):  # next_pair_for reads them after its open-pair check
        checked.wait(timeout=30)
        return verdicts(self, name)

    monkeypatch.setattr(CampaignStore, "verdicts", after_both_checked)
    with ThreadPoolExecutor(len(stores)) as pool:
        issued = list(pool.map(lambda store: next_pair_for(store, "race", "ana", np.random.default_rng(0)), stores))
    assert issued[0].pair_id == issued[1].pair_id
    open_rows = stores[0]._read(pairs.select().where(pairs.c.rater == "ana", pairs.c.answered_at.is_(None)))
    assert [row[0] for row in open_rows] == [issued[0].pair_id]


def heldout_loss_definition(family: str, systems: list[str]) -> dict:
    """eval.json's `heldout_loss` definition as `slapgen eval` writes it for a text-to-video model of `family`
    (trainer/evaluate/run.py), less the fields equal for every family here."""
    from slapgen.models.family import family_named

    objective = family_named(family).objective
    return {"what": f"the training objective ({objective}) on the held-out clips' cached latents at fixed timesteps "
                    "with noise seeded per clip; no generation",
            "seed": 0, "clips": 3, "objective": objective, "objectives": {system: "text-to-video" for system in systems}}


def answered_leaderboard(store: CampaignStore, name: str, preferred: str | None = None) -> dict:
    """The `overall` leaderboard after one rater answered every pair of `name`: `preferred` (a system) whenever
    shown, else the left video."""
    with TestClient(Starlette(routes=campaign_routes(store))) as client:
        while (pair := client.get(f"/campaigns/{name}/pair", params={"rater": "ana"}).json())["pair_id"] is not None:
            choice = "right" if store.pair(name, pair["pair_id"]).right == preferred else "left"
            client.post(f"/campaigns/{name}/ratings", json={"pair_id": pair["pair_id"], "rater": "ana",
                                                            "verdicts": {"overall": choice}})
        response = client.get(f"/campaigns/{name}/leaderboard")
    assert response.status_code == 200, response.text
    return response.json()["criteria"]["overall"]


@pytest.mark.parametrize("wan_family", ["cogvideox", "wan"])
def test_heldout_losses_of_two_objectives_are_not_compared_with_the_raters(monkeypatch, tmp_path, capsys, wan_family):
    """Guards a campaign from the evals of two models (`--from eval/steps --from eval/wan-steps`: CogVideoX,
    v-prediction; Wan, flow matching) computing heldout_loss's agreement with the raters and Kendall's tau
    over losses of two training objectives, which are not comparable numbers. The campaign is still made
    (people may compare two models) and CLIP, equally defined in both folders, stays; heldout_loss is left
    out and the leaderboard says why. With equal objectives (both CogVideoX) heldout_loss is compared."""
    clip = {"model": "openai/clip-vit-large-patch14", "what": "torchmetrics' CLIP score"}
    cog = write_eval_dir(tmp_path / "steps", ["base", "lora"], per_system=("heldout_loss",),
                         scores={"clip_score": {"base": 0.2, "lora": 0.3}, "heldout_loss": {"base": 0.9, "lora": 0.8}},
                         definitions={"clip_score": clip, "heldout_loss": heldout_loss_definition("cogvideox", ["base", "lora"])})
    other = write_eval_dir(tmp_path / "wan-steps", ["base", "lora"], per_system=("heldout_loss",),
                           scores={"clip_score": {"base": 0.1, "lora": 0.4}, "heldout_loss": {"base": 0.2, "lora": 0.1}},
                           definitions={"clip_score": clip,
                                        "heldout_loss": heldout_loss_definition(wan_family, ["base", "lora"])})
    assert run_cli(monkeypatch, tmp_path, "two", "--from", str(cog), "--from", str(other)) == 0
    said = capsys.readouterr().out
    store = CampaignStore(tmp_path / "data")
    board = answered_leaderboard(store, "two", preferred="steps-lora")  # all four tied (0.8% of draws) has no tau
    assert board["metrics"]["clip_score"]["agreement"]["compared"] > 0
    if wan_family == "cogvideox":
        assert set(board["metrics"]) == {"clip_score", "heldout_loss"} and board["metrics_left_out"] == {}
        assert "left out" not in said
        from scipy.stats import kendalltau

        losses = {"steps-base": 0.9, "steps-lora": 0.8, "wan-steps-base": 0.2, "wan-steps-lora": 0.1}  # eval.json has each + 0.01: tau reads the order only
        strengths = {s["system"]: s["strength"] for s in board["standings"]}
        expected = kendalltau([-losses[s] for s in losses], [strengths[s] for s in losses]).statistic
        assert board["metrics"]["heldout_loss"]["kendall_tau"] == pytest.approx(expected)
        return
    from slapgen.models.family import family_named

    assert set(board["metrics"]) == {"clip_score"}
    why = board["metrics_left_out"]["heldout_loss"]
    assert why == (f"heldout_loss is left out: steps-base and wan-steps-base have it defined differently (objective: "
                   f"{family_named('cogvideox').objective!r} against {family_named('wan').objective!r}), "
                   "so their numbers do not compare")
    assert board["metric_summary"].endswith(f" {why[0].upper()}{why[1:]}.")
    assert f"{why[0].upper()}{why[1:]}." in said.splitlines()  # `campaign create` says it at once
    assert store.get("two").system_scores["wan-steps-lora"] == {"clip_score": pytest.approx(0.41)}


def test_heldout_losses_of_clips_of_other_lengths_are_not_compared():
    """Guards a campaign over an eval with FVD (its clips 17 frames: FVD needs 16 or more) and one with `--metrics
    loss` (the model's 9) comparing their held-out losses: the same adapter on the same clips scored 1.062 and
    1.077 (a walk-through's find). eval records the clips' frames and size, and differing ones leave the loss out."""
    def definitions(frames: int, size: list[int]) -> dict:
        return {"heldout_loss": {"a-lora": {**heldout_loss_definition("cogvideox", ["lora"]), "frames": 17,
                                            "size": [32, 48]},
                                 "b-lora": {**heldout_loss_definition("cogvideox", ["lora"]), "frames": frames,
                                            "size": size}}}

    assert comparable_metrics(definitions(17, [32, 48])) == {}
    assert comparable_metrics(definitions(9, [32, 48])) == {"heldout_loss": (
        "heldout_loss is left out: a-lora and b-lora have it defined differently (frames: 17 against 9), so their "
        "numbers do not compare")}
    assert "size: [32, 48] against [64, 96]" in comparable_metrics(definitions(17, [64, 96]))["heldout_loss"]


def test_heldout_losses_in_two_latent_spaces_are_not_compared(tmp_path):
    """Guards a campaign over Wan 2.1 and Wan 2.2 evals (or CogVideoX-2b and -5b) comparing their held-out losses:
    same family, same objective, but another VAE (Wan 2.2's 16x spatial, 48 channels and its own normalisation;
    CogVideoX-5b's scaling factor 0.7 against 2b's 1.15), so the same loss is measured in other latents. The
    definitions' `latents` (from the real models' VAE configs) differ, and the rule leaves heldout_loss out; Wan
    2.1 1.3B and 14B share a VAE, and their losses still compare."""
    import hashlib

    from slapgen.models.family import VaeFactors
    from slapgen.models.reference_configs import COGVIDEOX_2B_VAE, COGVIDEOX_5B_VAE
    from slapgen.models.wan_configs import WAN21_VAE, WAN22_VAE

    wan21, wan22 = (VaeFactors.from_config(config).latent_space() for config in (WAN21_VAE, WAN22_VAE))
    digest = hashlib.sha256(json.dumps([WAN22_VAE["latents_mean"], WAN22_VAE["latents_std"]]).encode()).hexdigest()
    assert wan22 == ("VAE 4x16x16 (frames x height x width), scaling factor 1, 48 channels normalised by their "
                     f"mean/std (sha256 {digest[:12]})")
    assert wan21.startswith("VAE 4x8x8 (frames x height x width), scaling factor 1, 16 channels")
    cog2b, cog5b = (VaeFactors.from_config(config).latent_space() for config in (COGVIDEOX_2B_VAE, COGVIDEOX_5B_VAE))
    assert (cog2b, cog5b) == ("VAE 4x8x8 (frames x height x width), scaling factor 1.15258",
                              "VAE 4x8x8 (frames x height x width), scaling factor 0.7")

    def definitions(first: str, second: str) -> dict:
        return {"heldout_loss": {system: {**heldout_loss_definition("wan", ["lora"]), "latents": latents}
                                 for system, latents in (("a-lora", first), ("b-lora", second))}}

    assert comparable_metrics(definitions(wan21, wan21)) == {}  # 1.3B and 14B: one VAE
    assert comparable_metrics(definitions(wan21, wan22)) == {"heldout_loss": (
        f"heldout_loss is left out: a-lora and b-lora have it defined differently (latents: {wan21!r} against "
        f"{wan22!r}), so their numbers do not compare")}
    assert comparable_metrics(definitions(cog2b, cog5b)) != {}
    old = {"heldout_loss": {"a-lora": heldout_loss_definition("wan", ["lora"]),  # an eval.json from before `latents`
                            "b-lora": {**heldout_loss_definition("wan", ["lora"]), "latents": wan21}}}
    assert comparable_metrics(old) == {"heldout_loss": (
        "heldout_loss is left out: a-lora's eval does not record its latents (an eval made by an older slapgen), so it "
        "cannot be compared with b-lora's; run that eval again to compare them")}


def test_a_metric_from_another_evaluation_model_is_not_compared(tmp_path):
    """Guards the one rule (`comparable_metrics`: equal definitions) beyond the held-out loss: a CLIP score
    computed with another CLIP model in one folder is left out, while a sweep's model path written relative
    to its folder (trainer/sweep/report.py `shown_path`) and notes on one eval's prompts do not count as a
    difference."""
    models = tmp_path / "models" / "clip"
    models.mkdir(parents=True)
    first = write_eval_dir(tmp_path / "a", ["lora"], scores={"clip_score": {"lora": 0.2}, "flicker": {"lora": 0.5}},
                           definitions={"clip_score": {"model": str(models), "prompts_truncated": 0},
                                        "flicker": {"model": None}})
    second = write_eval_dir(tmp_path / "b", ["lora"], scores={"clip_score": {"lora": 0.3}, "flicker": {"lora": 0.6}},
                            definitions={"clip_score": {"model": "../models/clip", "prompts_truncated": 2},
                                         "flicker": {"model": None}})
    third = write_eval_dir(tmp_path / "c", ["lora"], scores={"clip_score": {"lora": 0.4}, "flicker": {"lora": 0.7}},
                           definitions={"clip_score": {"model": "openai/clip-vit-base-patch32"}, "flicker": {"model": None}})
    same = plan_campaign("same", [first, second])
    assert set(same.metric_directions) == {"clip_score", "flicker"} and same.metrics_left_out == {}
    mixed = plan_campaign("mixed", [first, second, third])
    assert set(mixed.metric_directions) == {"flicker"} and set(mixed.video_scores) == {"flicker"}
    assert mixed.metrics_left_out == {"clip_score": (
        f"clip_score is left out: a-lora and c-lora have it defined differently (model: {str(models.resolve())!r} "
        "against 'openai/clip-vit-base-patch32'), so their numbers do not compare")}


def test_a_ticft_adapters_heldout_loss_is_not_compared_with_a_text_to_video_one(tmp_path):
    """Guards one eval folder's TIC-FT adapter (its held-out loss: the layout's objective) and base (text-to-video)
    ranked together by heldout_loss in a campaign: eval's `objectives` gives each system its own, the rule
    compares each system's, so heldout_loss is left out; two TIC-FT adapters of one layout still compare."""
    definition = heldout_loss_definition("cogvideox", [])
    layout = "TIC-FT c1b1t3 (first-frame)"
    scores = {"heldout_loss": {"base": 0.5, "i2v": 0.4, "i2v_b": 0.3}, "flicker": {"base": 0.1, "i2v": 0.2, "i2v_b": 0.3}}
    folder = write_eval_dir(tmp_path / "eval", ["base", "i2v", "i2v_b"], scores=scores, per_system=("heldout_loss",),
                            definitions={"heldout_loss": definition | {"objectives": {
                                "base": "text-to-video", "i2v": layout, "i2v_b": layout}}})
    mixed = plan_campaign("mixed", [folder])
    assert set(mixed.metric_directions) == {"flicker"}
    assert mixed.metrics_left_out == {"heldout_loss": (
        f"heldout_loss is left out: base and i2v have it defined differently (objectives: 'text-to-video' against "
        f"{layout!r}), so their numbers do not compare")}
    assert "heldout_loss" not in mixed.system_scores["i2v"]
    same = plan_campaign("same", [folder], systems=["i2v", "i2v_b"])
    assert set(same.metric_directions) == {"flicker", "heldout_loss"} and same.metrics_left_out == {}
    # Base of that folder beside base of a text-to-video-only folder: the TIC-FT folder's definition carries eval's
    # `ticft` sentence, a note (review: it made two text-to-video losses "defined differently").
    plain = write_eval_dir(tmp_path / "plain", ["base"], scores={"heldout_loss": {"base": 0.6}, "flicker": {"base": 0.2}},
                           per_system=("heldout_loss",), definitions={"heldout_loss": definition | {"objectives": {
                               "base": "text-to-video"}}})
    with_note = {"heldout_loss": definition | {"ticft": "a TIC-FT adapter's loss is its layout's objective",
                                                "objectives": {"base": "text-to-video", "i2v": layout}}}
    noted = write_eval_dir(tmp_path / "noted", ["base", "i2v"], scores={"heldout_loss": {"base": 0.5, "i2v": 0.4},
                                                                        "flicker": {"base": 0.1, "i2v": 0.2}},
                           per_system=("heldout_loss",), definitions=with_note)
    bases = plan_campaign("bases", [plain, noted], systems=["plain-base", "noted-base"])
    assert set(bases.metric_directions) == {"flicker", "heldout_loss"} and bases.metrics_left_out == {}


def test_the_leaderboard_names_the_winners_lora_file(tmp_path):
    """Guards a leaderboard that named the winning system but not its LoRA file, so serving the winner meant
    digging through eval folders: once a criterion is done, `winner` holds the top system and the file eval.json
    gave it (absolute as eval writes it, or relative to the eval folder), the sentence the studio prints says it;
    before done there is no winner. The base model has no file, and a campaign stored before campaigns recorded
    files says where to look."""
    runs = tmp_path / "runs"
    files = {"lora_a": runs / "a" / "pytorch_lora_weights.safetensors", "lora_b": runs / "b" / "last.safetensors"}
    for file in files.values():
        file.parent.mkdir(parents=True)
        file.write_bytes(b"weights")
    folder = write_eval_dir(tmp_path / "eval", ["lora_a", "lora_b"], prompts=6, seeds=(0, 1),
                            adapters={"lora_a": str(files["lora_a"]), "lora_b": "../runs/b/last.safetensors"})
    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("pick", [folder]))
    assert store.get("pick").adapters == {name: str(file.resolve()) for name, file in files.items()}
    with TestClient(Starlette(routes=campaign_routes(store))) as client:
        assert client.get("/campaigns/pick/leaderboard").json()["criteria"]["overall"]["winner"] is None
    board = answered_leaderboard(store, "pick", preferred="lora_b")  # separated by its 7th straight win
    assert board["done"]
    top = board["standings"][0]["system"]
    assert top == "lora_b"
    path = str(files[top].resolve())
    assert board["reason"] == "separated"
    assert board["winner"] == {"system": top, "adapter": path, "separated": True, "sentence": (
        f"{top} won; its LoRA file is {path} (serve it: POST /adapters/upload, or copy it to "
        "SLAP_ADAPTERS_DIR/NAME.safetensors)")}
    from slapgen.evaluation.leaderboard import winner

    assert winner("base", {"base": None, "lora_a": path}) == {
        "system": "base", "adapter": None, "separated": True,
        "sentence": "base won: the base model, served without an adapter"}
    assert winner("lora_a", {})["sentence"] == (
        "lora_a won; this campaign was made before campaigns recorded LoRA files: the `adapter` of its system in the "
        "eval.json it came from names its file")


def test_a_campaign_stopped_by_its_budget_names_a_leader_not_a_winner(tmp_path):
    """Guards a leaderboard saying "X won" right under "the budget of 8 ratings is reached, on 4 prompts: too few
    to separate the top system from the second" (a walk-through's campaign): done by its budget without the top
    system separated, `winner` is the leader with `separated` false, and its sentence names the second it is not
    separated from; the LoRA file is still named (the budget is the decision to stop)."""
    files = {name: tmp_path / "runs" / name / "pytorch_lora_weights.safetensors" for name in ("lora_a", "lora_b")}
    for file in files.values():
        file.parent.mkdir(parents=True)
        file.write_bytes(b"weights")
    folder = write_eval_dir(tmp_path / "eval", ["lora_a", "lora_b"], prompts=3, seeds=(0,),
                            adapters={name: str(file) for name, file in files.items()})
    store = CampaignStore(tmp_path / "data")
    # One rating: two "left"s may fall one to each system, which are then level (the next test)
    store.create(plan_campaign("short", [folder], budget=1))
    with TestClient(Starlette(routes=campaign_routes(store, repeat_share=0))) as client:
        pair = client.get("/campaigns/short/pair", params={"rater": "ana"}).json()
        client.post("/campaigns/short/ratings", json={"pair_id": pair["pair_id"], "rater": "ana",
                                                     "verdicts": {"overall": "left"}}).raise_for_status()
        board = client.get("/campaigns/short/leaderboard").json()["criteria"]["overall"]
    assert (board["done"], board["reason"]) == (True, "budget")
    top, second = (standing["system"] for standing in board["standings"])
    path = str(files[top].resolve())
    assert board["winner"] == {"system": top, "adapter": path, "separated": False, "sentence": (
        f"{top} leads, but these ratings do not separate it from {second} (the budget ran out first); its LoRA file "
        f"is {path} (serve it: POST /adapters/upload, or copy it to SLAP_ADAPTERS_DIR/NAME.safetensors)")}


def test_the_default_budget_judges_every_pair_on_every_item(tmp_path):
    """Guards a walk-through's campaign of 4 systems on 2 items (default budget 12: "every pair once on every prompt
    and seed"): its two raters were shown one pair 4 times and never the top two, so the leaderboard had no direct
    comparison of them. Two raters rating at the same time, each asking for a pair while the other holds one (the
    review's find: the choice is the same for all until a verdict, so both were shown the same pair on the same item),
    until the campaign is done (the first system always preferred, so the fitted strengths soon tell pairs apart),
    judge each of the 6 pairs on each item once."""
    from slapgen.campaign_store import next_pair_for

    folder = write_eval_dir(tmp_path / "eval", ["a", "b", "c", "d"], prompts=2, seeds=(0,))
    for seed in range(4):
        store = CampaignStore(tmp_path / f"data{seed}")
        store.create(plan_campaign("round", [folder]))
        generator = np.random.default_rng(seed)
        shown, holding, said = [], {}, ""
        for turn in range(40):
            rater = ("ana", "ben")[turn % 2]
            if rater in holding:  # answers the pair it holds, then asks for the next
                pair = holding.pop(rater)
                store.answer("round", pair.pair_id, rater, {"overall": "left" if pair.left < pair.right else "right"})
            said = next_pair_for(store, "round", rater, generator, repeat_share=0)
            if not isinstance(said, str):
                shown.append((frozenset((said.left, said.right)), said.item))
                holding[rater] = said
            elif not holding:
                break
        assert "is done: its budget of 12 ratings is reached" in said, said
        assert len(shown) == len(set(shown)) == 12, (seed, shown)


def test_a_budget_that_ends_on_level_systems_says_they_are_level(tmp_path):
    """Guards the leader's sentence when the top two are of equal strength: "X leads, but these ratings do not
    separate it from Y" named one of two level systems the leader (a walk-through's run and base model, 7 of 8 won
    each). Two ties and the budget of 2 reached: both ranked 1, and the sentence says they are level."""
    folder = write_eval_dir(tmp_path / "eval", ["lora_a", "lora_b"], prompts=3, seeds=(0,))
    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("even", [folder], budget=2))
    with TestClient(Starlette(routes=campaign_routes(store, repeat_share=0))) as client:
        for _ in range(2):
            pair = client.get("/campaigns/even/pair", params={"rater": "ana"}).json()
            client.post("/campaigns/even/ratings", json={"pair_id": pair["pair_id"], "rater": "ana",
                                                        "verdicts": {"overall": "tie"}}).raise_for_status()
        board = client.get("/campaigns/even/leaderboard").json()["criteria"]["overall"]
    assert (board["done"], board["reason"]) == (True, "budget")
    assert [standing["rank"] for standing in board["standings"]] == [1, 1]
    top, second = (standing["system"] for standing in board["standings"])
    assert board["winner"]["separated"] is False
    assert board["winner"]["sentence"] == (f"{top} and {second} are level: these ratings give them equal strength (the "
                                           "budget ran out first); a campaign with a larger --budget can tell them apart")


def test_no_pair_is_issued_past_the_budget_nor_a_repeat_once_every_pair_is_judged(tmp_path):
    """Guards a budget that bounded nothing (a walk-through's campaign with --budget 8 was issued and rated past it:
    `list` read 10/8) and a rater told "judged every pair" who got a repeat a few calls later (5% of calls),
    then the sentence again; and `campaign delete` counting repeats as ratings (11 there, 10 in `list`). Once the
    budget's ratings are in (repeats do not count, as in `list`), a rater without an open pair gets no pair and
    the sentence saying the campaign is done; one with an open pair still gets it and may answer it. Pairs other
    raters hold open count against the budget too (300 made-up raters asking at once each got one and rated a
    campaign of budget 18, an attack's find). A rater who judged every pair gets the sentence even when the draw
    asks for a repeat."""
    from slapgen.campaign_store import next_pair_for

    folder = write_eval_dir(tmp_path / "eval", ["lora_a", "lora_b"], prompts=3, seeds=(0,))
    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("short", [folder], budget=3))
    # No repeat at random: the test issues its one repeat itself (store.issue_pair below).
    with TestClient(Starlette(routes=campaign_routes(store, repeat_share=0))) as client:
        def pair_for(rater: str) -> dict:
            return client.get("/campaigns/short/pair", params={"rater": rater}).json()

        def rate(pair: dict) -> None:
            client.post("/campaigns/short/ratings", json={"pair_id": pair["pair_id"], "rater": pair["rater"],
                                                         "verdicts": {"overall": "left"}}).raise_for_status()

        first, held = pair_for("ana"), pair_for("ben")  # ben's pair stays open while the budget fills
        rate(first)
        shown = store.pair("short", first["pair_id"])
        repeat = store.issue_pair("short", "ana", shown.right, shown.left, shown.item, repeat=True)
        assert pair_for("ana")["pair_id"] == repeat.pair_id
        rate(pair_for("ana"))  # the repeat: not a rating
        rate(pair_for("ana"))
        assert store.rating_count("short") == 2
        # ben's open pair holds the budget's last place: nobody else is issued one (raters asking together overran it)
        assert pair_for("cleo") == {"campaign": "short", "pair_id": None, "rater": "cleo", "message": (
            "short's budget of 3 ratings is spoken for: 2 given and 1 pair with other raters, not answered yet; ask "
            "again later (a pair unanswered for 30 minutes gives up its place)")}
        assert pair_for("ben")["pair_id"] == held["pair_id"]  # an open pair is still answered
        rate(held)
        assert pair_for("cleo") == {"campaign": "short", "pair_id": None, "rater": "cleo",
                                    "message": "short is done: its budget of 3 ratings is reached (3 given)"}
        assert pair_for("ben")["message"] == "short is done: its budget of 3 ratings is reached (3 given)"
        assert store.overview()[0]["ratings"] == 3
    with pytest.raises(CampaignRatedError) as refused:
        store.delete("short")
    assert str(refused.value) == ("campaign short has 3 ratings (and 1 repeat of a pair shown again) from 2 raters, "
                                  "which deleting it loses")

    store.create(plan_campaign("one", [write_eval_dir(tmp_path / "one", ["lora_a", "lora_b"], prompts=1, seeds=(0,))],
                               budget=5))  # room for more raters: dora's one pair is not the budget's last
    only = next_pair_for(store, "one", "dora", np.random.default_rng(0))
    store.answer("one", only.pair_id, "dora", {"overall": "right"})
    assert next_pair_for(store, "one", "dora", np.random.default_rng(0), repeat_share=1.0) == (
        "dora has judged every pair of systems on every prompt and seed of one")


def test_a_pair_request_costs_the_same_queries_however_many_pairs_the_rater_answered(tmp_path, database_url):
    """Guards a pair request that read every pair its rater had answered, one query each, to draw a repeat from
    them (200 ms a request at 120 answered pairs on SQLite; a round trip each on PostgreSQL). The statements one
    request runs are counted after 2 and after 12 answered pairs: the same number. And the repeat drawn is the one
    the generator's draw names among the rater's answered pairs, oldest first, sides swapped (the reference: the
    pairs in the order this test answered them, and the index the generator's last `integers` call returned)."""
    from sqlalchemy import event

    from slapgen.campaign_store import next_pair_for

    class RecordedDraws:
        """A generator that notes what each `integers` call was asked and returned."""

        def __init__(self, seed: int):
            self.generator, self.integer_draws = np.random.default_rng(seed), []

        def random(self):
            return self.generator.random()

        def integers(self, high):
            drawn = self.generator.integers(high)
            self.integer_draws.append((int(high), int(drawn)))
            return drawn

    store = CampaignStore(tmp_path / "data", database_url)
    folder = write_eval_dir(tmp_path / "many", ["base", "lora_a", "lora_b", "lora_c"], prompts=4, seeds=(0, 1))
    store.create(plan_campaign("many", [folder]))  # 6 pairs on 8 items; ties all: never separated
    statements = []
    event.listen(store._engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    answered, queries = [], {}
    for count in range(1, 13):
        pair = next_pair_for(store, "many", "ana", np.random.default_rng(count), repeat_share=0)
        store.answer("many", pair.pair_id, "ana", {"overall": "tie"})
        answered.append(pair)
        other = next_pair_for(store, "many", "ben", np.random.default_rng(count), repeat_share=0)
        store.answer("many", other.pair_id, "ben", {"overall": "tie"})  # another rater's pairs are not drawn
        if count in (2, 12):
            statements.clear()
            draws = RecordedDraws(100 + count)
            repeat = next_pair_for(store, "many", "ana", draws, repeat_share=1.0)
            queries[count] = len(statements)
            high, index = draws.integer_draws[-1]  # the repeat's draw comes last
            assert (high, repeat.repeat) == (count, True)
            assert (repeat.left, repeat.right, repeat.item) == (answered[index].right, answered[index].left,
                                                                answered[index].item)
            store.answer("many", repeat.pair_id, "ana", {"overall": "tie"})
    assert queries[2] == queries[12], queries


def test_a_campaign_separated_on_every_criterion_issues_no_more_pairs_and_says_so(tmp_path):
    """Guards raters kept rating after the result was settled: a campaign whose leaderboard said "separated" on every
    criterion still issued pairs until its budget (or forever without one), and those ratings could not change the
    winner. After every rating here the pair route's answer is checked against the leaderboard itself: no pair, and
    the sentence, exactly when every criterion's reason is "separated"; while one criterion is not (overall is
    separated first, motion_accuracy only tied), pairs keep coming."""
    folder = write_eval_dir(tmp_path / "eval", ["lora_a", "lora_b"], prompts=5, seeds=(0, 1))
    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("clear", [folder], criteria=["overall", "motion_accuracy"], budget=40))
    reasons_seen = []
    with TestClient(Starlette(routes=campaign_routes(store, repeat_share=0))) as client:
        for rating in range(40):
            rater = f"r{rating}"
            pair = client.get("/campaigns/clear/pair", params={"rater": rater}).json()
            board = client.get("/campaigns/clear/leaderboard").json()["criteria"]
            reasons = {criterion: board[criterion]["reason"] for criterion in board}
            reasons_seen.append(reasons)
            if all(reason == "separated" for reason in reasons.values()):
                assert pair == {"campaign": "clear", "pair_id": None, "rater": rater, "message": (
                    "clear is done: on every criterion its top system is separated from the second (its leaderboard "
                    "names the winner); more ratings would not change who won")}
                break
            assert pair["pair_id"] is not None, (rating, reasons)
            a_side = "left" if store.pair("clear", pair["pair_id"]).left == "lora_a" else "right"
            motion = "tie" if reasons["overall"] != "separated" else a_side  # motion only once overall is settled
            client.post("/campaigns/clear/ratings", json={"pair_id": pair["pair_id"], "rater": rater, "verdicts": {
                "overall": a_side, "motion_accuracy": motion}}).raise_for_status()
        else:
            pytest.fail(f"never separated on both: {reasons_seen[-1]}")
    assert any(r == {"overall": "separated", "motion_accuracy": None} for r in reasons_seen), reasons_seen


def test_raters_asking_at_the_same_moment_on_several_workers_take_no_more_than_the_budget(tmp_path, database_url):
    """Guards the budget's own check-then-insert (a review's find): the budget was checked against the ratings and
    open pairs counted before the insert, so raters asking at once on several workers (each its own store, as
    each worker has) each passed the same count and were all issued a pair. Eight raters at once on eight stores,
    a budget of 3: three pairs are issued, the other five hear that the budget is spoken for."""
    from concurrent.futures import ThreadPoolExecutor

    from slapgen.campaign_store import next_pair_for

    eval_dir = write_eval_dir(tmp_path / "eval", ["lora_a", "lora_b", "lora_c"], prompts=3, seeds=(0, 1))
    CampaignStore(tmp_path / "data", database_url).create(plan_campaign("rush", [eval_dir], budget=3))
    stores = [CampaignStore(tmp_path / "data", database_url) for _ in range(8)]
    start = threading.Barrier(len(stores))

    def ask(k: int):
        start.wait()
        return next_pair_for(stores[k], "rush", f"r{k}", np.random.default_rng(k), repeat_share=0)

    with ThreadPoolExecutor(len(stores)) as pool:
        answers = list(pool.map(ask, range(len(stores))))
    issued = [answer for answer in answers if not isinstance(answer, str)]
    assert len(issued) == 3, answers
    assert all("budget of 3 ratings is spoken for" in answer for answer in answers if isinstance(answer, str))


def test_a_pair_left_unanswered_gives_up_its_budget_place_after_the_hold(tmp_path):
    """Guards the other side of open pairs holding budget places: a rater who walked away would hold the last place
    for good. After OPEN_PAIR_HOLD_S the place is free for another rater (and the old pair may still be answered)."""
    from sqlalchemy import update

    from slapgen.campaign_store import OPEN_PAIR_HOLD_S, next_pair_for, pairs

    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("one", [write_eval_dir(tmp_path / "eval", ["lora_a", "lora_b"], prompts=2,
                                                      seeds=(0,))], budget=1))
    left = next_pair_for(store, "one", "ana", np.random.default_rng(0), repeat_share=0)
    assert "is spoken for" in next_pair_for(store, "one", "ben", np.random.default_rng(0), repeat_share=0)
    with store._engine.begin() as db:
        db.execute(update(pairs).where(pairs.c.pair_id == left.pair_id).values(
            issued_at=pairs.c.issued_at - OPEN_PAIR_HOLD_S - 1))
    assert next_pair_for(store, "one", "ben", np.random.default_rng(0), repeat_share=0).rater == "ben"
    store.answer("one", left.pair_id, "ana", {"overall": "left"})


def test_folders_given_twice_or_of_other_prompts_are_named_as_such(tmp_path):
    """Guards two misleading refusals (a walk-through's): `--from eval/two --from eval/two` read "system two-base
    has two videos of prompt 0 seed 1", and evals of other held-out clips read "lacks prompt 0 seed 0" of a system
    that has that video, of another prompt. Each now says what is wrong."""
    one = write_eval_dir(tmp_path / "one", ["base", "lora"], prompts=2, seeds=(0,))
    with pytest.raises(CampaignError) as twice:
        plan_campaign("c", [one, tmp_path / "one" / ".." / "one"])
    assert str(twice.value) == f"--from names {tmp_path / 'one' / '..' / 'one'} twice"
    other = write_eval_dir(tmp_path / "other", ["hot"], prompts=2, seeds=(0,))
    result = json.loads((other / "eval.json").read_text())
    result["prompts"][0]["caption"] = "another clip's caption"
    (other / "eval.json").write_text(json.dumps(result))
    with pytest.raises(CampaignError) as prompts:
        plan_campaign("c", [one, other])
    assert str(prompts.value) == (
        f"the folders' prompts differ (prompt 0 is {CAPTIONS[0]!r} in one and "
        f"{'another clip' + chr(39) + 's caption'!r} in another): evals of other held-out clips cannot be rated side by side; evaluate every "
        "system on the same --heldout")


def test_a_metric_measured_for_some_systems_only_is_left_out_and_other_settings_are_said(tmp_path):
    """Guards a leaderboard comparing metrics one system's eval never measured (`compared 0`, `rate null`, and
    `metrics_left_out` empty) and a campaign of videos made with other settings (17 frames and 4 steps beside 9
    frames and 1 step) created without a word: the metric is left out naming the system, and the plan's note
    names the settings that differ, system by system."""
    full = write_eval_dir(tmp_path / "full", ["base", "lora"], seeds=(0,),
                          scores={"clip_score": {"base": 0.1, "lora": 0.2}, "flicker": {"base": 0.5, "lora": 0.4}})
    short = write_eval_dir(tmp_path / "short", ["fast"], seeds=(0,), scores={"flicker": {"fast": 0.3}})
    for folder, generation in ((full, {"num_frames": 17, "num_inference_steps": 4, "fps": 8}),
                               (short, {"num_frames": 9, "num_inference_steps": 1, "fps": 8})):
        result = json.loads((folder / "eval.json").read_text())
        (folder / "eval.json").write_text(json.dumps({**result, "generation": generation}))
    plan = plan_campaign("c", [full, short])
    assert plan.metrics_left_out == {"clip_score": "clip_score is left out: the eval of fast did not measure it, so it "
                                                   "cannot be compared across every system"}
    assert set(plan.metric_directions) == {"flicker"}
    assert plan.notes == ["note: the systems' videos were made with other generation settings (base: num_frames 17, "
                          "num_inference_steps 4; fast: num_frames 9, num_inference_steps 1; lora: num_frames 17, "
                          "num_inference_steps 4); raters will see them side by side as they are, and metrics compare "
                          "them so"]
    assert plan_campaign("same", [full]).notes == [] and plan_campaign("same", [full]).metrics_left_out == {}


def test_a_near_miss_of_a_shared_criterion_is_refused_naming_it(eval_dir):
    """Guards `--criteria overal,motion_acuracy` creating a campaign whose criteria are typos for good (its
    ratings never read alike with the studio's): a near miss of a shared criterion is refused naming it; a name of
    one's own (`motion`) is fine."""
    with pytest.raises(CampaignError) as refused:
        plan_campaign("c", [eval_dir], criteria=["overal", "motion"])
    assert str(refused.value) == (
        "criterion 'overal' is spelt like the studio's 'overall': use overall (names shared with the studio's "
        "ratings, motion_accuracy, impact_realism, prompt_adherence, overall, read alike), or a name of your own "
        "that is not a near miss")
    with pytest.raises(CampaignError, match="'motion_acuracy' is spelt like the studio's 'motion_accuracy'"):
        plan_campaign("c", [eval_dir], criteria=["motion_acuracy"])
    assert plan_campaign("c", [eval_dir], criteria=["overall", "motion"]).criteria == ["overall", "motion"]


def test_a_campaign_of_too_few_items_is_told_it_ends_on_its_budget(tmp_path):
    """Guards a campaign that can never separate its top system and says nothing: on 6 prompts with one seed, the
    direct comparisons (one per prompt/seed item) can never reach the evidence separation needs (8 straight wins),
    whatever the raters say; with a second seed (12 items) they can."""
    from trainer.campaign import few_prompts_sentence

    one_seed = plan_campaign("c", [write_eval_dir(tmp_path / "one", ["base", "lora"], prompts=6, seeds=(0,))])
    assert few_prompts_sentence(one_seed.items, one_seed.budget) == (
        "note: 6 prompt/seed items, and separation needs the top system to beat the second on at least 8 of them: the "
        "leaderboard can never call the top system separated from the second, so the campaign ends only on its budget "
        "of 6 ratings; eval on more held-out clips or --seeds for a campaign that can separate them")
    two_seeds = plan_campaign("c", [write_eval_dir(tmp_path / "two", ["base", "lora"], prompts=6, seeds=(0, 1))])
    assert few_prompts_sentence(two_seeds.items, two_seeds.budget) is None


def test_three_spellings_of_a_prompt_and_an_unrecorded_setting_are_said_as_such(tmp_path):
    """Guards the review's finds: three folders whose prompt 0 differs read "'a' in one and 'b' in one and 'c' in
    another", captions that differ under other seeds fell through to "lacks ...", and a setting one eval does not
    record read "num_frames None"."""
    folders = []
    for k, caption in enumerate(["first caption", "second caption", "third caption"]):
        folder = write_eval_dir(tmp_path / f"e{k}", [f"s{k}"], prompts=1, seeds=(k,))
        result = json.loads((folder / "eval.json").read_text())
        result["prompts"][0]["caption"] = caption
        (folder / "eval.json").write_text(json.dumps(result))
        folders.append(folder)
    with pytest.raises(CampaignError) as three:
        plan_campaign("c", folders)
    assert str(three.value).startswith("the folders' prompts differ (prompt 0 is written 3 ways: 'first caption', "
                                       "'second caption', 'third caption'): ")
    recorded = write_eval_dir(tmp_path / "recorded", ["base"], prompts=1, seeds=(0,))
    result = json.loads((recorded / "eval.json").read_text())
    (recorded / "eval.json").write_text(json.dumps({**result, "generation": {"num_frames": 17}}))
    bare = write_eval_dir(tmp_path / "bare", ["lora"], prompts=1, seeds=(0,))
    assert plan_campaign("c", [recorded, bare]).notes[0].startswith(
        "note: the systems' videos were made with other generation settings (base: num_frames 17; lora: num_frames "
        "not recorded)")


def test_a_malformed_range_gets_the_whole_video_and_a_good_one_its_bytes(tmp_path):
    """Guards Starlette's 400 (in its own plain-text words) for a malformed Range on a campaign video (`bytes=5-1`,
    `items=0-5`, `bytes=`): RFC 9110 has a server ignore such a header, so the answer is the whole file, 200, byte
    for byte the file on disk; a valid range still gets 206 with those bytes, and one past the end 416."""
    folder = write_eval_dir(tmp_path / "eval", ["lora_a", "lora_b"], prompts=1, seeds=(0,))
    store = CampaignStore(tmp_path / "data")
    store.create(plan_campaign("ranged", [folder]))
    with TestClient(Starlette(routes=campaign_routes(store, repeat_share=0))) as client:
        url = client.get("/campaigns/ranged/pair", params={"rater": "ana"}).json()["left"]["video"]
        whole = store.video_file("ranged", url.rsplit("/", 1)[1].removesuffix(".mp4")).read_bytes()
        for malformed in ("bytes=5-1", "items=0-5", "bytes=", "bytes=x-y", "nonsense"):
            answer = client.get(url, headers={"Range": malformed})
            assert (answer.status_code, answer.content) == (200, whole), malformed
        answer = client.get(url, headers={"Range": "bytes=5-9"})
        assert (answer.status_code, answer.content) == (206, whole[5:10])
        assert client.get(url, headers={"Range": f"bytes={len(whole) + 5}-"}).status_code == 416
