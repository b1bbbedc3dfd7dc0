"""The service's database: SLAP_DATABASE_URL checked once, and alembic migrations that keep every row of
the SQLite files the code before them wrote."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from slapgen.campaign_store import CampaignStore
from slapgen.errors import SettingsError
from slapgen.serving.jobs import JobBoard
from slapgen.serving.ratings import RatingStore

# The CREATE statements of the code before alembic (slapgen/serving/jobs.py, ratings.py and
# slapgen/campaign_store.py as they were), written out so the test does not depend on the code it checks.
# The jobs table is the oldest shape, before the owner and worker columns.
OLD_JOBS = ("CREATE TABLE IF NOT EXISTS jobs (task_id TEXT PRIMARY KEY, state TEXT, step INTEGER, "
            "total_steps INTEGER, error TEXT, updated_at REAL)")
OLD_RATINGS = ("CREATE TABLE IF NOT EXISTS ratings (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL, "
               "rater TEXT, criterion TEXT, choice TEXT, left_system TEXT, left_scale REAL, "
               "right_system TEXT, right_scale REAL, prompt TEXT, seed INTEGER)")
OLD_CAMPAIGNS = (
    "CREATE TABLE IF NOT EXISTS campaigns (name TEXT PRIMARY KEY, created_at REAL, spec TEXT)",
    "CREATE TABLE IF NOT EXISTS videos (token TEXT PRIMARY KEY, campaign TEXT, system TEXT, item INTEGER, "
    "file TEXT, UNIQUE (campaign, system, item))",
    "CREATE TABLE IF NOT EXISTS pairs (pair_id TEXT PRIMARY KEY, campaign TEXT, rater TEXT, left_system TEXT, "
    "right_system TEXT, item INTEGER, repeat INTEGER, issued_at REAL, answered_at REAL)",
    "CREATE INDEX IF NOT EXISTS pairs_by_rater ON pairs (campaign, rater, answered_at)",
    "CREATE TABLE IF NOT EXISTS verdicts (id INTEGER PRIMARY KEY AUTOINCREMENT, campaign TEXT, pair_id TEXT, "
    "rater TEXT, criterion TEXT, choice TEXT, created_at REAL)",
    "CREATE INDEX IF NOT EXISTS verdicts_by_campaign ON verdicts (campaign, id)",
)
SPEC = ('{"systems": ["base", "lora"], "items": [{"prompt_index": 0, "prompt": "a slap", "seed": 3}], '
        '"criteria": ["overall"], "budget": 1, "sources": [], "metric_directions": {}, "system_scores": {}, '
        '"video_scores": {}}')


def _old_database(path, statements, rows):
    db = sqlite3.connect(path)
    with db:
        for statement in statements:
            db.execute(statement)
        for statement, values in rows:
            db.execute(statement, values)
    db.close()


def _versions(path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {row[0] for row in db.execute("SELECT version_num FROM alembic_version")}
    finally:
        db.close()


def test_databases_written_before_alembic_are_migrated_with_every_row_kept(tmp_path):
    """Guards an upgrade that loses ratings or jobs: SQLite files made by the code before alembic (its
    CREATE statements above, with rows) open with every row as it was, the board's later columns and
    BentoML's spelling of its states added, the schema stamped at each branch's head, and new rows
    written beside the old ones."""
    cache, data = tmp_path / "cache", tmp_path / "data"
    cache.mkdir()
    data.mkdir()
    _old_database(cache / "jobs.sqlite", [OLD_JOBS], [
        ("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?)", ("old-done", "completed", 30, 30, None, 1000.0)),
        ("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?)", ("old-cancelled", "cancelled", 4, 30, "stopped", 1001.0)),
    ])
    _old_database(data / "ratings.sqlite", [OLD_RATINGS], [
        ("INSERT INTO ratings (created_at, rater, criterion, choice, left_system, left_scale, right_system, "
         "right_scale, prompt, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
         (1000.5, "ana", "overall", "left", "base", 1.0, "lora", 0.5, "a slap", 7)),
    ])
    _old_database(data / "campaigns.sqlite", OLD_CAMPAIGNS, [
        ("INSERT INTO campaigns VALUES (?, ?, ?)", ("old", 900.0, SPEC)),
        ("INSERT INTO videos VALUES (?, ?, ?, ?, ?)", ("tok-base", "old", "base", 0, "tok-base.mp4")),
        ("INSERT INTO videos VALUES (?, ?, ?, ?, ?)", ("tok-lora", "old", "lora", 0, "tok-lora.mp4")),
        ("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", ("p1", "old", "ana", "base", "lora", 0, 0, 901.0, 902.0)),
        ("INSERT INTO verdicts (campaign, pair_id, rater, criterion, choice, created_at) VALUES (?, ?, ?, ?, ?, ?)",
         ("old", "p1", "ana", "overall", "right", 902.0)),
    ])

    board = JobBoard(cache / "jobs.sqlite", owner=123)
    assert board.get("old-done") == {"task_id": "old-done", "state": "completed", "step": 30, "total_steps": 30,
                                     "error": None, "updated_at": 1000.0, "created_at": None, "started_at": None}
    assert board.get("old-cancelled")["state"] == "canceled"  # the old spelling, migrated
    board.submitted("new-job", 5)
    assert board.cancel("new-job")["state"] == "canceled"
    assert _versions(cache / "jobs.sqlite") == {"jobs_0005"}

    ratings = RatingStore(data / "ratings.sqlite")
    assert ratings.all() == [{"id": 1, "created_at": 1000.5, "rater": "ana", "criterion": "overall", "choice": "left",
                              "left_system": "base", "left_scale": 1.0, "right_system": "lora", "right_scale": 0.5,
                              "prompt": "a slap", "seed": 7, "model": None}]  # which model made it is not known
    assert ratings.add([{**ratings.all()[0], "rater": "ben"}], "tiny") == [2]
    assert ratings.all()[1]["model"] == "tiny"
    assert _versions(data / "ratings.sqlite") == {"ratings_0002"}

    campaigns = CampaignStore(data)
    assert [c["name"] for c in campaigns.overview()] == ["old"] and campaigns.overview()[0]["ratings"] == 1
    assert [(v["rater"], v["preferred"], v["prompt"]) for v in campaigns.verdicts("old")] == [("ana", "lora", "a slap")]
    assert campaigns.pair("old", "p1").left_video == "tok-base"
    assert _versions(data / "campaigns.sqlite") == {"campaigns_0002"}

    # Opening again (a worker after the server, a restart) changes nothing.
    assert JobBoard(cache / "jobs.sqlite").get("old-done")["state"] == "completed"
    assert len(RatingStore(data / "ratings.sqlite").all()) == 2


def test_three_stores_share_one_database_each_at_its_own_head(tmp_path):
    """Guards stores that cannot share one database (SLAP_DATABASE_URL): the job board, ratings and
    campaigns each migrate their own alembic branch into one file, and each works there."""
    url = f"sqlite:///{tmp_path / 'one.sqlite'}"
    board, ratings, campaigns = JobBoard(url), RatingStore(url), CampaignStore(tmp_path / "data", url)
    board.submitted("job", 3)
    ratings.add([{"rater": "ana", "criterion": "overall", "choice": "tie", "left_system": "base", "left_scale": 1.0,
                  "right_system": "a", "right_scale": 1.0, "prompt": "p", "seed": 2**40}], "tiny")
    assert board.get("job")["state"] == "queued" and ratings.all()[0]["seed"] == 2**40
    assert campaigns.overview() == [] and not (tmp_path / "data" / "campaigns.sqlite").exists()
    assert _versions(tmp_path / "one.sqlite") == {"jobs_0005", "ratings_0002", "campaigns_0002"}


@pytest.mark.parametrize("value, sentence", [
    ("mysql://user@host/db", "the mysql database is not supported"),
    ("postgresql://user@host", "must name its database"),
    ("sqlite://", "must name a file"),
])
def test_a_bad_database_url_is_one_sentence_naming_the_setting(monkeypatch, value, sentence):
    """Guards a SLAP_DATABASE_URL that only fails at the first query (or in every worker): it is checked
    once with the other settings, and the sentence names the variable."""
    from slapgen.serving.settings import load_settings

    monkeypatch.setenv("SLAP_DATABASE_URL", value)
    with pytest.raises(SettingsError, match=f"SLAP_DATABASE_URL: .*{sentence}"):
        load_settings()


def test_a_postgresql_url_is_driven_by_psycopg_and_unset_keeps_the_sqlite_files(monkeypatch, tmp_path):
    """Guards `postgresql://` reaching SQLAlchemy's default driver (psycopg2, not installed), and an unset
    URL that moved the stores away from their SQLite files (an upgrade would lose them)."""
    from slapgen.serving.settings import load_settings

    monkeypatch.setenv("SLAP_DATABASE_URL", "postgresql://slap:secret@db:5432/slapgen")
    assert load_settings().database_url == "postgresql+psycopg://slap:secret@db:5432/slapgen"
    monkeypatch.delenv("SLAP_DATABASE_URL")
    monkeypatch.setenv("SLAP_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.store_database(tmp_path / "ratings.sqlite") == tmp_path / "ratings.sqlite"
    assert settings.results_dir == tmp_path / "results"


def _rating(rater: str, criterion: str, choice: str = "left") -> dict:
    return {"rater": rater, "criterion": criterion, "choice": choice, "left_system": "base", "left_scale": 1.0,
            "right_system": "lora", "right_scale": 1.0, "prompt": "a slap", "seed": 1}


def test_ratings_from_many_writers_are_all_kept_and_a_broken_submission_leaves_nothing(database_url):
    """Guards ratings lost or half-stored when several workers (or replicas on one PostgreSQL) write at
    once: eight stores adding two-row submissions (two criteria of one blind pair) concurrently keep all 16
    rows, each id once, as 8 rated pairs; a submission whose second row is broken stores neither row."""
    from concurrent.futures import ThreadPoolExecutor

    stores = [RatingStore(database_url) for _ in range(8)]
    start = threading.Barrier(len(stores))

    def submit(k):
        start.wait()
        return stores[k].add([_rating(f"r{k}", "overall"), _rating(f"r{k}", "motion_accuracy", "tie")], "tiny")

    with ThreadPoolExecutor(len(stores)) as pool:
        ids = [i for batch in pool.map(submit, range(len(stores))) for i in batch]
    rows = stores[0].all()
    assert sorted(ids) == [row["id"] for row in rows] and len(set(ids)) == 16
    assert sorted((row["rater"], row["criterion"]) for row in rows) == sorted(
        (f"r{k}", c) for k in range(8) for c in ("overall", "motion_accuracy"))
    broken = {key: value for key, value in _rating("x", "motion_accuracy").items() if key != "seed"}
    with pytest.raises(KeyError):
        stores[1].add([_rating("x", "overall"), broken], "tiny")
    assert len(stores[2].all()) == 16 and stores[2].summary("tiny")["rated_pairs"] == 8


def test_a_rating_posted_twice_at_the_same_moment_is_stored_once(database_url):
    """Guards the 409's check-then-insert race across workers or replicas: the check ran before any lock, so a
    second post of the same rating, checked while the first was inserted but not yet committed, was stored as a
    second verdict. Here another writer holds the same rating uncommitted while a second store adds it: the add
    waits for that writer's commit, then refuses, and one row is stored."""
    from sqlalchemy import insert

    from slapgen.database import open_store
    from slapgen.errors import RatingConflictError
    from slapgen.serving.ratings import ratings

    store = RatingStore(database_url)
    outcome = {}

    def second_post():
        try:
            outcome["ids"] = store.add([_rating("ana", "overall")], "tiny")
        except RatingConflictError as error:
            outcome["refused"] = str(error)

    with open_store(database_url, "ratings").begin() as first_post:
        first_post.execute(insert(ratings).values(created_at=0.0, model="tiny", **_rating("ana", "overall")))
        racing = threading.Thread(target=second_post)
        racing.start()
        racing.join(timeout=1.5)  # its check ran meanwhile (before the fix it inserted and returned)
    racing.join(timeout=30)
    assert "ana has rated base against lora" in outcome.get("refused", ""), outcome
    assert len(store.all()) == 1


def test_the_ratings_summary_is_computed_once_per_change_of_the_ratings(database_url, monkeypatch):
    """Guards every GET /ratings/summary computing the bootstrap again (10 s and 3 GB for 20,000 rated prompts, any
    number of clients at once; a review's find): the summary is computed once for the same ratings, again after any
    store (another worker or replica) adds one, and always equals the summary of every rating as they are then."""
    import slapgen.serving.ratings as ratings_module

    computed = []
    summarise = ratings_module.summarise
    monkeypatch.setattr(ratings_module, "summarise",
                        lambda rows, memo=None: computed.append(len(rows)) or summarise(rows, memo))
    reader, writer = RatingStore(database_url), RatingStore(database_url)
    empty = {"model": "tiny", **summarise([]), "other_models": []}
    assert reader.summary("tiny") == empty and reader.summary("tiny") == empty
    writer.add([_rating("ana", "overall")], "tiny")
    writer.add([_rating("ben", "overall", "right")], "tiny")
    assert reader.summary("tiny") == {"model": "tiny", **summarise(reader.all()), "other_models": []}
    assert reader.summary("tiny")["ratings"] == 2 and reader.summary("tiny") is reader.summary("tiny")
    writer.add([_rating("cleo", "overall", "tie")], "tiny")
    assert reader.summary("tiny") == {"model": "tiny", **summarise(reader.all()), "other_models": []}
    assert reader.summary("tiny")["ratings"] == 3
    assert computed == [0, 2, 3]
    # Unchanged ratings are learnt from their count and newest id: no request reads every row (80,000 for 20,000 pairs).
    reads = []
    monkeypatch.setattr(reader, "all", lambda: reads.append(1) or RatingStore.all(reader))
    assert reader.summary("tiny")["ratings"] == 3 and reads == []
    writer.add([_rating("dan", "overall")], "tiny")
    assert reader.summary("tiny")["ratings"] == 4 and reads == [1]


def test_a_new_rating_bootstraps_its_own_group_alone_and_the_summary_is_unchanged(monkeypatch):
    """Guards every new rating running the bootstrap of every (system pair, criterion) group again: a soak's summary
    took 1.6 s at 8,650 ratings of 2,213 groups, at each new rating, and the studio asks after every one. With the
    memo, a rating added to one group of three runs one bootstrap, a group gone (its ratings reassigned) leaves the
    memo, and every summary equals `summarise` without a memo, row for row."""
    import slapgen.serving.ratings as ratings_module

    bootstraps = []
    win_rate = ratings_module.win_rate
    monkeypatch.setattr(ratings_module, "win_rate", lambda comparisons: bootstraps.append(1) or win_rate(comparisons))

    def with_memo(rows: list[dict], memo: dict) -> tuple[dict, int]:
        """The memo's summary, checked against a memo-less one, and the bootstraps the memo's call ran."""
        reference = ratings_module.summarise(rows)
        bootstraps.clear()
        summary = ratings_module.summarise(rows, memo)
        assert summary == reference
        return summary, len(bootstraps)

    rows = [{**_rating(f"r{k}", criterion), "right_system": right, "prompt": f"p{k % 4}", "created_at": float(k)}
            for k in range(12) for criterion, right in (("overall", "lora"), ("motion", "lora"), ("overall", "other"))]
    memo: dict = {}
    assert with_memo(rows, memo)[1] == 3
    assert with_memo(rows, memo)[1] == 0
    rows.append({**_rating("new", "motion", "tie"), "prompt": "p9", "created_at": 99.0})
    summary, ran = with_memo(rows, memo)
    assert ran == 1 and len(summary["pairs"]) == 3
    survivors = [row for row in rows if row["right_system"] == "lora"]
    assert with_memo(survivors, memo)[1] == 0 and len(memo) == 2


def test_each_models_summary_is_of_its_own_ratings_and_counts_the_others_apart(database_url, tmp_path):
    """Guards a store shared by servers of two models (one SLAP_DATA_DIR or PostgreSQL) mixing their ratings: tiny-wan's
    `base` counted as tiny's `base`. Each rating records its model; a model's summary is `summarise` of its own rows
    (the same numbers as a store holding only them), and lists other models' verdicts, then those stored before
    ratings recorded their model (NULL), by count."""
    from slapgen.serving.ratings import ratings, summarise
    from sqlalchemy import insert

    shared, alone = RatingStore(database_url), RatingStore(tmp_path / "tiny-alone.sqlite")
    for store in (shared, alone):
        store.add([_rating("ana", "overall"), _rating("ana", "motion_accuracy", "tie")], "tiny")
        store.add([_rating("ben", "overall", "right")], "tiny")
    shared.add([_rating("wan", "overall", "right")] * 3, "tiny-wan")
    with shared._engine.begin() as db:  # two verdicts from before ratings recorded their model
        db.execute(insert(ratings).values([{**_rating("old", "overall"), "model": None}] * 2))

    tiny, wan = shared.summary("tiny"), shared.summary("tiny-wan")
    assert {key: value for key, value in tiny.items() if key != "other_models"} == {
        key: value for key, value in alone.summary("tiny").items() if key != "other_models"}
    assert (tiny["ratings"], tiny["rated_pairs"]) == (3, 2)
    assert tiny["other_models"] == [{"model": "tiny-wan", "ratings": 3}, {"model": None, "ratings": 2}]
    assert wan == {"model": "tiny-wan", **summarise([row for row in shared.all() if row["model"] == "tiny-wan"]),
                   "other_models": [{"model": "tiny", "ratings": 3}, {"model": None, "ratings": 2}]}
    assert [(row["wins"], row["losses"]) for row in wan["pairs"]] == [(0, 3)]  # base lost all three (sorted first)
    assert [row["model"] for row in shared.all()] == ["tiny"] * 3 + ["tiny-wan"] * 3 + [None] * 2


def test_ratings_without_a_model_are_assigned_theirs_and_every_summary_sees_it(database_url):
    """Guards ratings stored before ratings recorded their model staying out of every summary after an upgrade (an
    upgrade must never lose ratings), and a summary cached by a running server hiding the assignment: its stamp was
    (count, newest id), which an assignment leaves as they were. `assign_model` gives the unrecorded ones a model
    (or moves a model's, to mend a mistake); every store's next summary is `summarise` of the model's rows then."""
    from slapgen.serving.ratings import ratings, summarise
    from sqlalchemy import insert

    server, cli = RatingStore(database_url), RatingStore(database_url)
    server.add([_rating("ana", "overall"), _rating("ana", "motion_accuracy", "tie")], "tiny")
    with server._engine.begin() as db:  # three verdicts from before ratings recorded their model
        db.execute(insert(ratings).values([{**_rating(rater, "overall", "right"), "model": None}
                                           for rater in ("old1", "old2", "old3")]))
    assert server.summary("tiny")["ratings"] == 2 and server.summary("tiny")["other_models"] == [
        {"model": None, "ratings": 3}]
    assert cli.model_counts() == [("tiny", 2), (None, 3)]

    assert cli.assign_model("tiny") == 3 and cli.assign_model("tiny") == 0  # once: then none is unrecorded
    summary = server.summary("tiny")
    assert summary == {"model": "tiny", **summarise(server.all()), "other_models": []}
    assert (summary["ratings"], summary["rated_pairs"]) == (5, 4)
    assert [(row["wins"], row["ties"], row["losses"]) for row in summary["pairs"] if row["criterion"] == "overall"] == [
        (1, 0, 3)]

    assert cli.assign_model("tiny-wan", "tiny") == 5  # a mistake mended: every tiny rating moves
    assert server.summary("tiny") == {"model": "tiny", **summarise([]), "other_models": [{"model": "tiny-wan",
                                                                                          "ratings": 5}]}
    assert server.summary("tiny-wan")["ratings"] == 5 and cli.model_counts() == [("tiny-wan", 5)]


def test_without_postgresql_its_tests_skip_with_one_reason_unless_ci_requires_it(monkeypatch):
    """Guards a missing PostgreSQL that errors every parametrised test with a traceback, or that CI would
    skip silently: without Debian's binaries the tests skip with one sentence saying what to install, and
    with SLAP_REQUIRE_POSTGRES (set by .ci/run) they fail with it."""
    import tests.postgres as postgres

    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("SLAP_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        postgres.start_postgres()
    monkeypatch.setenv("SLAP_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        postgres.start_postgres()


def test_a_database_migrated_by_a_newer_slapgen_is_one_sentence(database_url):
    """Guards an older replica starting on a database a newer slapgen migrated (a rolling upgrade): alembic's
    "Can't locate revision" escaped start-up (which catches SQLAlchemy's errors) as a traceback. Opening a
    store there is one SettingsError naming the revision and what to do, and the database is unchanged."""
    from sqlalchemy import create_engine, text

    JobBoard(database_url)
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as db:
        db.execute(text("UPDATE alembic_version SET version_num = 'jobs_9999' WHERE version_num LIKE 'jobs_%'"))
    with pytest.raises(SettingsError) as refused:
        JobBoard(database_url)
    assert str(refused.value) == ("the database's jobs schema (revision jobs_9999) is newer than this slapgen's; "
                                  "upgrade slapgen to the version that migrated it, or give this one another database")
    with engine.connect() as db:
        assert [row[0] for row in db.execute(text("SELECT version_num FROM alembic_version"))] == ["jobs_9999"]
    engine.dispose()


def test_a_newer_revision_of_another_store_is_named_as_that_stores(database_url, tmp_path):
    """Guards the sentence naming the wrong schema: a database whose campaigns a newer slapgen migrated stopped
    `bentoml serve` (which opens the job board first) with "the database's jobs schema (revision campaigns_0099)";
    every store shares alembic_version, so the store named is the unknown revision's own."""
    from sqlalchemy import create_engine, text

    JobBoard(database_url)
    CampaignStore(tmp_path / "data", database_url)
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as db:
        db.execute(text("UPDATE alembic_version SET version_num = 'campaigns_0099' "
                        "WHERE version_num LIKE 'campaigns_%'"))
    with pytest.raises(SettingsError) as refused:
        JobBoard(database_url)
    assert str(refused.value) == ("the database's campaigns schema (revision campaigns_0099) is newer than this "
                                  "slapgen's; upgrade slapgen to the version that migrated it, or give this one "
                                  "another database")
    engine.dispose()


@pytest.mark.parametrize("revision, table, column", [("jobs_0001", "jobs", "host"), ("ratings_0001", "ratings", "model")])
def test_a_migration_killed_after_adding_its_column_runs_again(database_url, revision, table, column):
    """Guards a start killed between an ADD COLUMN (SQLite commits it on its own) and the version stamp: every later
    start failed with "duplicate column name: host" (jobs_0002). A store at the revision before whose table already
    has the next revision's column migrates to the head and works."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from slapgen.database import alembic_config

    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as db:
        command.upgrade(alembic_config(db), revision)
        db.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} TEXT"))
    engine.dispose()
    if table == "jobs":
        board = JobBoard(database_url, owner=7)
        board.submitted("after-the-kill", 3)
        assert board.get("after-the-kill")["state"] == "queued"
    else:
        ratings = RatingStore(database_url)
        ratings.add([_rating("ana", "overall")], "tiny")
        assert [row["model"] for row in ratings.all()] == ["tiny"]


@pytest.mark.parametrize("failing", ["initdb", "postgres"])
def test_a_postgresql_that_fails_to_start_leaves_no_folder_behind(monkeypatch, tmp_path, failing):
    """Guards the test fixture leaking a temp folder (and maybe a server) on every failed start: its
    clean-up began only after start_postgres returned. An initdb or a server start that fails removes the
    folder it made and raises."""
    import subprocess
    import tempfile
    from pathlib import Path

    import tests.postgres as postgres

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(postgres, "server_binaries", lambda: Path("/usr/lib/postgresql/15/bin"))
    monkeypatch.setattr(postgres.os, "geteuid", lambda: 1000)  # no chown to the postgres user
    ran = []

    def run(self, tool, *args):
        ran.append(tool)
        (self.folder / "data").mkdir()
        if tool == failing:
            raise subprocess.CalledProcessError(1, tool)

    def start(self):
        ran.append("postgres")
        raise RuntimeError("postgres exited with 1 at start-up")

    monkeypatch.setattr(postgres.PostgresServer, "run", run)
    monkeypatch.setattr(postgres.PostgresServer, "start", start)
    with pytest.raises((subprocess.CalledProcessError, RuntimeError)):
        postgres.start_postgres()
    assert ran[-1] == failing and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_tests_postgresql_ends_with_the_process_that_started_it(tmp_path):
    """Guards a test run killed before its teardown (CI stopped, a Ctrl-C twice, a SIGKILL) leaving its session's
    PostgreSQL running for good: `pg_ctl start` made it a daemon. A process that starts one as the fixture does is
    killed with SIGKILL; its server's postmaster (the pid in postmaster.pid) ends within seconds."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.conftest import REPO_ROOT
    from tests.postgres import server_binaries

    if server_binaries() is None:
        pytest.skip("PostgreSQL's server binaries are not installed")
    starter = subprocess.Popen(
        [sys.executable, "-c", "import time; from tests.postgres import start_postgres; server = start_postgres(); "
                               "print(server.folder, flush=True); time.sleep(600)"],
        # TMPDIR left out: the tests' own (mode 700) is closed to the postgres user the server runs as under root
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items() if k != "TMPDIR"})
    try:
        folder = starter.stdout.readline().strip()
        assert folder, "start_postgres printed no folder"
        postmaster = int((Path(folder) / "data" / "postmaster.pid").read_text().splitlines()[0])
        os.kill(postmaster, 0)  # running
    finally:
        starter.send_signal(signal.SIGKILL)
        starter.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(postmaster, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(postmaster, signal.SIGQUIT)
        pytest.fail(f"the postmaster {postmaster} outlived the process that started it")
    shutil.rmtree(folder, ignore_errors=True)


def test_a_campaign_name_or_video_token_no_campaign_can_have_is_not_found_on_either_database(database_url, tmp_path):
    """Guards a NUL in a campaign name or video token from a URL (`/campaigns/c%00/leaderboard`) reaching the query:
    PostgreSQL refuses such text with a DataError, which the service answered as a 500 with a traceback. A name or
    token outside their patterns is not looked up: the campaign is not found, on SQLite and PostgreSQL alike."""
    from slapgen.errors import CampaignNotFoundError

    store = CampaignStore(tmp_path / "data", database_url)
    for name in ("c\x00", "C", "x" * 65):
        with pytest.raises(CampaignNotFoundError, match="no campaign named"):
            store.get(name)
        with pytest.raises(CampaignNotFoundError):
            store.video_file(name, "ab")


def test_an_outage_is_told_from_a_query_that_fails_again(database_url):
    """Guards the one rule behind the job board's retries and the service's 503 (`database_unreachable`): a database
    that does not answer (nothing listens, an SQLite folder not there) or a pool with no connection free is an
    outage to wait out; a query that fails again whatever the wait (a missing table, a syntax error) is not, so
    it is neither retried for minutes nor answered "try again in a few seconds". On SQLite and PostgreSQL alike."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import QueuePool

    from slapgen.database import database_unreachable, store_url
    from tests.test_job_leases import _unreachable_engine

    def raised(engine, statement: str = "SELECT 1") -> SQLAlchemyError:
        with pytest.raises(SQLAlchemyError) as caught:
            with engine.connect() as db:
                db.execute(text(statement))
        return caught.value

    JobBoard(database_url)  # the database exists and has its tables
    url = store_url(database_url)
    assert database_unreachable(raised(_unreachable_engine(database_url)))
    reachable = create_engine(url)
    assert not database_unreachable(raised(reachable, "SELECT * FROM no_such_table"))
    assert not database_unreachable(raised(reachable, "SELEKT 1"))
    pool = create_engine(url, poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=0.2)
    with pool.connect():
        assert database_unreachable(raised(pool))
    assert not database_unreachable(ValueError("not a database error"))
    if url.startswith("sqlite"):  # another process holding SQLite's write lock past the busy timeout
        from slapgen.database import lock_for_writing
        from slapgen.serving.jobs import jobs

        impatient = create_engine(url, connect_args={"timeout": 0.2})
        with create_engine(url).begin() as holder:
            lock_for_writing(holder, jobs)
            assert database_unreachable(raised(impatient, "DELETE FROM jobs"))
