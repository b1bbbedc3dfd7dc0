"""What `bentoml serve` checks at start-up, without a server: each failure is one StartupError sentence."""

from __future__ import annotations

import pytest

from slapgen.errors import StartupError
from slapgen.serving.jobs import JobBoard
from slapgen.serving.ratings import RatingStore
from slapgen.serving.startup import claim_task_store, with_store


def test_an_unusable_store_folder_or_file_is_one_sentence_naming_the_setting(tmp_path):
    """Guards start-up tracebacks (OSError from mkdir, sqlite3.DatabaseError from a damaged file) when
    SLAP_CACHE_DIR / SLAP_DATA_DIR is a file or jobs.sqlite is not a database, and BENTOML_HOME cannot
    hold the task store's lock: each is a StartupError naming the file, the reason and the setting."""
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("not a folder")
    garbage = tmp_path / "jobs.sqlite"
    garbage.write_bytes(b"\x00garbage\xff" * 512)
    cases = [(not_a_folder / "jobs.sqlite", JobBoard, "SLAP_CACHE_DIR", f"File exists: {not_a_folder}"),
             (garbage, JobBoard, "SLAP_CACHE_DIR", "file is not a database"),
             (not_a_folder / "ratings.sqlite", RatingStore, "SLAP_DATA_DIR", f"File exists: {not_a_folder}")]
    for path, store, variable, reason in cases:
        with pytest.raises(StartupError) as refused:
            with_store("the store", path, variable, store)
        assert str(refused.value) == (f"cannot use the store {path} ({reason}); {variable} must be a writable folder, "
                                      "and a file there that is not an SQLite database slapgen wrote must be moved away")
    assert garbage.read_bytes() == b"\x00garbage\xff" * 512  # left as it was
    with pytest.raises(StartupError, match=f"cannot write BentoML's task store lock {not_a_folder}/task_result.db.lock "
                                           rf"\(File exists: {not_a_folder}\); BENTOML_HOME must be a writable folder"):
        claim_task_store(str(not_a_folder / "task_result.db"))


def test_a_store_opened_on_first_use_opens_once_and_only_when_used(tmp_path):
    """Guards the service's stores being opened by importing service.py (`bentoml build` migrated the database in
    SLAP_DATABASE_URL): a `StoreOnFirstUse` opens its store at the first attribute a caller uses, once, through
    `with_store` (an unusable one is the same one sentence, raised there); copying it or asking for a private name
    opens nothing (`copy` recursed into `__getattr__` before a review's fix)."""
    import copy

    from slapgen.serving.startup import StoreOnFirstUse

    opened = []

    def open_board(where):
        opened.append(where)
        return JobBoard(where)

    store = StoreOnFirstUse("the job board", tmp_path / "jobs.sqlite", "SLAP_CACHE_DIR", open_board)
    copy.copy(store)
    assert not hasattr(store, "_engine") and opened == [] and not (tmp_path / "jobs.sqlite").exists()
    assert store.get("t1") is None and store.submitted("t1", 4)["state"] == "queued"
    assert store.get("t1")["state"] == "queued" and opened == [tmp_path / "jobs.sqlite"]

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"\x00garbage\xff" * 512)
    broken = StoreOnFirstUse("the job board", garbage, "SLAP_CACHE_DIR", JobBoard)
    with pytest.raises(StartupError, match=r"^cannot use the job board .*garbage.sqlite .*SLAP_CACHE_DIR must be"):
        broken.get("t1")
    # `use(action)`: the open store's answer, through the same sentence when the database fails it
    assert store.use(lambda board: board.get("t1")["state"]) == "queued" and len(opened) == 1
    with pytest.raises(StartupError, match=r"^cannot use the job board .*garbage.sqlite .*SLAP_CACHE_DIR must be"):
        broken.use(lambda board: board.end_orphaned("gone"))


def test_the_studio_address_is_one_a_browser_on_this_machine_opens():
    """Guards start-up's studio line naming an address no browser opens: a server on every address (BentoML's
    default 0.0.0.0, or ::) is reached at localhost; an IPv6 address goes in brackets; HTTPS where BentoML serves
    TLS; no address for port 0."""
    from slapgen.serving.startup import browser_address

    assert browser_address("0.0.0.0", 3000) == "http://localhost:3000"
    assert browser_address("::", 3000) == "http://localhost:3000"
    assert browser_address("127.0.0.1", 3001) == "http://127.0.0.1:3001"
    assert browser_address("::1", 3000) == "http://[::1]:3000"
    assert browser_address("gpu-7.lab", 8080) == "http://gpu-7.lab:8080"
    assert browser_address("0.0.0.0", 443, tls=True) == "https://localhost:443"  # --ssl-certfile
    assert browser_address("0.0.0.0", 0) is None  # --port 0: the port is known only once it listens
