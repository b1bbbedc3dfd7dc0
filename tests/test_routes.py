"""The extra routes in process (Starlette's TestClient on the real app and a real tiny engine): fast
checks of statuses, the one error shape, auth, and that disk work never runs on the event loop."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
from datetime import datetime, timezone

import pytest
from starlette.testclient import TestClient

from prompts import default_library
from slapgen.engine.generator import VideoGenerator
from slapgen.engine.params import EngineOptions, GenerationParams
from slapgen.models.loading import resolve_model
from slapgen.serving.jobs import JobBoard
from slapgen.campaign_store import CampaignStore
from slapgen.serving.ratings import RatingStore
from slapgen.serving.routes import build_routes

TOKEN = "route-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def engine(tiny_cache_dir, adapter_files, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("route-adapters")
    shutil.copy(adapter_files["a"], adapters / "a.safetensors")
    return VideoGenerator.load(resolve_model("tiny", tiny_cache_dir), EngineOptions(adapters_dir=adapters, max_lora_rank=8))


@pytest.fixture
def client(engine, tmp_path):
    jobs = JobBoard()
    jobs.queued("task-1", 4)
    jobs.step("task-1", 2, 4)
    with TestClient(build_routes(lambda: engine, jobs, TOKEN, default_library(), RatingStore(tmp_path / "ratings.sqlite"), CampaignStore(tmp_path / "data"))) as test_client:
        yield test_client


def assert_error_shape(response, status: int, field: str | None = None) -> dict:
    """slapgen's one error shape: {"error": sentence, "detail": [{"loc": [...], "msg": sentence}]}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert [d["loc"] for d in body["detail"]] == [field.split(".")], body
    return body


def upload(client, name, data, headers=AUTH):
    return client.post("/adapters/upload", data={"name": name}, files={"file": (f"{name}.safetensors", data)},
                       headers=headers)


def test_info_and_templates(client):
    info = client.get("/info").json()
    assert (info["model"], info["max_lora_rank"], info["queue"]) == ("tiny", 8, 0)
    assert (info["attention"], info["cache"], info["cache_hooked_modules"]) == ("sdpa", "none", 0)
    assert {t["name"] for t in client.get("/templates").json()["templates"]} == set(default_library().templates)


def test_upload_list_delete_with_statuses_and_one_error_shape(client, adapter_files):
    assert_error_shape(upload(client, "c", adapter_files["c"].read_bytes(), headers={}), 401)
    assert_error_shape(client.delete("/adapters/a"), 401)
    created = upload(client, "c", adapter_files["c"].read_bytes())
    assert created.status_code == 201 and created.json()["rank"] == 2
    assert_error_shape(upload(client, "c", adapter_files["c"].read_bytes()), 409, "name")
    assert_error_shape(upload(client, "d", b"not safetensors"), 400, "file")
    assert_error_shape(upload(client, "d", adapter_files["big"].read_bytes()), 400, "file")
    assert_error_shape(upload(client, "Bad Name", adapter_files["c"].read_bytes()), 400, "name")
    assert_error_shape(client.post("/adapters/upload", content=b"x", headers={**AUTH, "content-type": "text/plain"}), 400)
    assert {a["name"] for a in client.get("/adapters").json()["adapters"]} == {"a", "c"}
    assert client.delete("/adapters/c", headers=AUTH).json() == {"deleted": "c"}
    assert_error_shape(client.delete("/adapters/c", headers=AUTH), 404, "name")


def test_uploads_sent_together_are_checked_one_at_a_time(engine, adapter_files, tmp_path, monkeypatch):
    """Guards uploads at once each holding its whole file (up to 2 GiB) and then its tensors in the worker's
    memory: a handful sent together (a sweep's LoRAs pushed at once) could take a replica's memory, and every
    client's requests with it. Three uploads sent at once are read and checked one after another (the check
    is slowed down so that any overlap shows), and all three are stored."""
    import threading
    import time

    import httpx

    real_add, lock, inside, most = engine.adapters.add, threading.Lock(), [0], [0]

    def add(name, data):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.2)
            return real_add(name, data)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(engine.adapters, "add", add)
    app = build_routes(lambda: engine, JobBoard(), TOKEN, default_library(), RatingStore(tmp_path / "r.sqlite"),
                       CampaignStore(tmp_path / "data"))
    names = {"together-1": "c", "together-2": "d", "together-3": "b"}

    async def send_together():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await asyncio.gather(*(
                client.post("/adapters/upload", data={"name": name}, headers=AUTH,
                            files={"file": (f"{name}.safetensors", adapter_files[source].read_bytes())})
                for name, source in names.items()))

    try:
        answers = asyncio.run(send_together())
        assert [answer.status_code for answer in answers] == [201, 201, 201], [answer.text for answer in answers]
        assert most[0] == 1
    finally:
        for name in set(names) & set(engine.adapters.names()):
            engine.adapters.remove(name)


def test_upload_and_delete_are_refused_without_a_configured_token(engine, adapter_files, tmp_path):
    with TestClient(build_routes(lambda: engine, JobBoard(), None, default_library(), RatingStore(tmp_path / "r.sqlite"), CampaignStore(tmp_path / "data"))) as client:
        body = assert_error_shape(upload(client, "c", adapter_files["c"].read_bytes()), 403)
        assert "SLAP_API_TOKEN" in body["error"]


def test_job_progress(client):
    """Guards an unknown task id echoed whole in its 404 (a 100 KB made-up id came back whole): an id longer than
    any /jobs/submit answers is a 400 that says its length, not the id."""
    assert client.get("/jobs/progress", params={"task_id": "task-1"}).json()["step"] == 2
    assert_error_shape(client.get("/jobs/progress"), 400, "task_id")
    assert_error_shape(client.get("/jobs/progress", params={"task_id": "nope"}), 404, "task_id")
    huge = assert_error_shape(client.get("/jobs/progress", params={"task_id": "x" * 10_000}), 400, "task_id")
    assert huge["error"] == ("task_id is the id /jobs/submit answered; this one has 10000 characters, more than any "
                             "job's id has")
    odd = assert_error_shape(client.get("/jobs/progress", params={"task_id": "a\nb"}), 400, "task_id")
    assert odd["error"] == "task_id is the id /jobs/submit answered; this one has characters no id has"


def _small(engine, adapter: str | None) -> GenerationParams:
    return GenerationParams.defaults_for(engine.spec, seed=1, num_inference_steps=1, num_frames=5, height=32, width=48,
                                         adapter=adapter)


def test_an_adapter_deleted_or_replaced_is_no_longer_named_loaded(client, engine, adapter_files):
    """Guards `GET /adapters`' `loaded` and `in_memory`, and `/info`'s `adapter`, naming an adapter deleted or
    replaced since the last generation (here, or by another replica on the shared folder): the slot still holds
    its old weights, but a request naming it now runs a new file or is refused. Each is named again only once a
    generation has run what the folder holds."""
    def loaded() -> tuple[str | None, str | None, list[str]]:
        listing = client.get("/adapters").json()
        return listing["loaded"], client.get("/info").json()["adapter"], listing["in_memory"]

    for name, source in (("f", "c"), ("g", "a")):
        assert upload(client, name, adapter_files[source].read_bytes()).status_code == 201
    engine.generate_frames(_small(engine, "f"))
    assert loaded()[:2] == ("f", "f") and "f" in loaded()[2]

    # Replaced by another replica (an atomic write: a new file, a new modification time).
    folder = engine.adapters.folder
    (folder / ".f.tmp").write_bytes(adapter_files["c"].read_bytes())
    stat = (folder / "f.safetensors").stat()
    os.utime(folder / ".f.tmp", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    os.replace(folder / ".f.tmp", folder / "f.safetensors")
    assert loaded()[:2] == (None, None) and "f" not in loaded()[2]
    swaps = engine.slot.swaps
    engine.generate_frames(_small(engine, "f"))
    assert engine.slot.swaps == swaps + 1  # the new file was swapped in
    assert loaded()[:2] == ("f", "f") and "f" in loaded()[2]

    assert client.delete("/adapters/f", headers=AUTH).status_code == 200
    assert loaded()[:2] == (None, None) and "f" not in loaded()[2]

    engine.generate_frames(_small(engine, "g"))
    assert loaded()[:2] == ("g", "g")
    (folder / "g.safetensors").unlink()  # deleted by another replica: this one's memory still has it
    assert loaded()[:2] == (None, None) and "g" not in loaded()[2]
    engine.generate_frames(_small(engine, None))
    assert loaded()[:2] == (None, None)


def test_disk_work_runs_off_the_event_loop(client, engine, adapter_files, monkeypatch):
    """Guards handlers that list, validate, write or delete adapters on the event loop, where one slow
    disk stalls every other request: each such call must run where no event loop is running."""
    on_loop = []

    def off_loop(method):
        def wrapped(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(method.__name__)
            except RuntimeError:
                pass  # a worker thread: no running loop here
            return method(*args, **kwargs)
        return wrapped

    engine.generate_frames(_small(engine, "a"))  # an adapter in effect: listing it stats its file
    for name in ("describe", "add", "remove", "is_current", "cached_names"):
        monkeypatch.setattr(engine.adapters, name, off_loop(getattr(engine.adapters, name)))
    assert client.get("/adapters").status_code == 200 and client.get("/info").status_code == 200
    assert upload(client, "e", adapter_files["c"].read_bytes()).status_code == 201
    assert client.delete("/adapters/e", headers=AUTH).status_code == 200
    assert on_loop == []


PART = b"--zz\r\n"
NAME_PART = PART + b'Content-Disposition: form-data; name="name"\r\n\r\ncrafted\r\n'
CRAFTED_UPLOADS = {
    "no boundary": ("multipart/form-data", NAME_PART + b"--zz--\r\n"),
    "empty boundary": ("multipart/form-data; boundary=", NAME_PART + b"--zz--\r\n"),
    "no content-disposition": ("multipart/form-data; boundary=zz", PART + b"\r\n\r\nx\r\n--zz--\r\n"),
    "not form-data": ("multipart/form-data; boundary=zz", PART + b"Content-Disposition: attachment\r\n\r\nx\r\n--zz--\r\n"),
    "non-UTF-8 field name": ("multipart/form-data; boundary=zz", PART + b'Content-Disposition: form-data; name="\xff"\r\n\r\nx\r\n--zz--\r\n'),
    "bad charset": ("multipart/form-data; boundary=zz; charset=nonsense", NAME_PART + b"--zz--\r\n"),
    "truncated": ("multipart/form-data; boundary=zz", NAME_PART[:-4]),
    "file as text field": ("multipart/form-data; boundary=zz",
                           NAME_PART + PART + b'Content-Disposition: form-data; name="file"\r\n\r\nabc\r\n--zz--\r\n'),
    "two files": ("multipart/form-data; boundary=zz", NAME_PART + 2 * (PART + b'Content-Disposition: form-data; '
                  b'name="file"; filename="a"\r\n\r\nabc\r\n') + b"--zz--\r\n"),
    "20000 part headers": ("multipart/form-data; boundary=zz",
                           PART + b'Content-Disposition: form-data; name="name"\r\n' + b"X-A: b\r\n" * 20000 + b"\r\nx\r\n--zz--\r\n"),
    "5000-byte boundary": ("multipart/form-data; boundary=" + "z" * 5000, b"--" + b"z" * 5000 + b"\r\n\r\nx\r\n"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_UPLOADS))
def test_crafted_uploads_are_400s_that_leave_nothing_behind(client, engine, case):
    """Guards 'some crafted upload headers are 500s, and an upload that answers 500 keeps its file, after
    which GET /adapters is 500 for everyone': each malformed multipart body is a 400 in the error shape,
    the adapters folder is unchanged, and /adapters still answers."""
    before = sorted(p.name for p in engine.adapters.folder.iterdir())
    content_type, body = CRAFTED_UPLOADS[case]
    response = client.post("/adapters/upload", content=body, headers={**AUTH, "content-type": content_type})
    assert_error_shape(response, 400)
    assert sorted(p.name for p in engine.adapters.folder.iterdir()) == before
    assert client.get("/adapters").status_code == 200


GOOD_RATING = {"left": {"adapter": None}, "right": {"adapter": "a", "adapter_scale": 0.5}, "prompt": "a slap",
               "seed": 3, "choices": {"overall": "right", "impact_realism": "tie"}, "rater": "ana"}


@pytest.mark.parametrize("change, field", [
    ({"choices": {}}, "choices"),
    ({"choices": {"overall": "both"}}, "choices.overall"),
    ({"choices": {"style": "left"}}, "choices.style.[key]"),
    ({"left": {"adapter": "../etc"}}, "left.adapter"),
    ({"right": {"adapter": None}}, "right"),  # the same system on both sides
    ({"right": {"adapter": None, "adapter_scale": 0.5}}, "right"),  # base at any scale is base (it passed)
    # A system this server does not serve (made-up names grew /ratings/summary's work for every rater).
    ({"right": {"adapter": "nobody-served-this"}}, "right.adapter"),
    ({"left": {"adapter": "nobody-served-this"}}, "left.adapter"),
    ({"right": {"adapter": "aa"}}, "right.adapter"),  # named with "did you mean a?" (below)
    ({"seed": -1}, "seed"),
    ({"prompt": ""}, "prompt"),
    ({"rater": "x" * 65}, "rater"),
    ({"extra": 1}, "extra"),
])
def test_a_bad_rating_is_a_400_naming_the_field_and_writes_nothing(client, change, field):
    """Guards the ratings endpoint storing half-valid verdicts: every bad body is a 400 whose detail
    names the field, and the store is unchanged."""
    before = client.get("/ratings.csv").text
    response = client.post("/ratings", json={**GOOD_RATING, **change})
    body = assert_error_shape(response, 400)
    assert [".".join(map(str, d["loc"])) for d in body["detail"]][0] == field, body
    if change == {"right": {"adapter": "aa"}}:  # a near miss of a served adapter is named
        assert body["error"].startswith("unknown adapter 'aa' (did you mean a?); available: a"), body
    assert client.get("/ratings.csv").text == before


def test_ratings_are_stored_exported_and_summarised_with_the_eval_statistics(client, tmp_path):
    """Guards the summary's arithmetic and the CSV: three verdicts for `a@0.5` and one for base on
    `overall` over two prompts give base a win rate of 1/4 and the exact two-sided sign-test p of
    1 loss in 4 untied comparisons (2 * 5/16 = 0.625); a prompt that starts like a spreadsheet formula
    is exported inert."""
    verdicts = [("a slap", "right"), ("a slap", "right"), ("=HYPERLINK(1)", "left"), ("=HYPERLINK(1)", "right")]
    for seed, (prompt, choice) in enumerate(verdicts):  # each of other videos (one rater's again is a 409)
        response = client.post("/ratings", json={**GOOD_RATING, "prompt": prompt, "seed": seed,
                                                 "choices": {"overall": choice}})
        assert response.status_code == 201 and len(response.json()["ids"]) == 1
    rows = client.get("/ratings.csv").text.splitlines()
    assert rows[0].split(",")[:5] == ["id", "created_at", "rater", "criterion", "choice"]
    # `created_at` in ISO 8601, UTC (it was seconds since the epoch): the moment the store holds.
    exported = next(csv.DictReader(io.StringIO(client.get("/ratings.csv").text)))
    stored = RatingStore(tmp_path / "ratings.sqlite").all()[0]["created_at"]
    assert datetime.fromisoformat(exported["created_at"]) == datetime.fromtimestamp(stored, timezone.utc)
    # base has no scale (it was stored as 1.0, as if an adapter ran at full strength); the adapter keeps its own
    assert (exported["left_system"], exported["left_scale"], exported["right_scale"]) == ("base", "", "0.5")
    assert len(rows) == 5 and sum("'=HYPERLINK(1)" in row for row in rows) == 2
    pair = client.get("/ratings/summary").json()["pairs"]
    assert [(p["systems"], p["criterion"]) for p in pair] == [(["a@0.5", "base"], "overall")]
    # Sorted names put a@0.5 first: it won 3 of 4.
    assert (pair[0]["rate"], pair[0]["wins"], pair[0]["losses"], pair[0]["units"]) == (0.75, 3, 1, 2)
    assert pair[0]["sign_test_p"] == pytest.approx(2 * (1 + 4) / 16)


def test_the_summary_counts_rated_pairs_and_flags_rows_under_ten_prompts(client):
    """Guards a summary that counted verdicts as ratings ("4 ratings stored" for one pair rated on 4
    criteria) and said nothing of a sample too small for its interval: 2 pairs rated (one on 2 criteria,
    one on 1) are 2 pairs and 3 verdicts; `overall` over 2 prompts is flagged, over 10 prompts it is not."""
    for prompt, choices in (("p0", {"overall": "left", "impact_realism": "tie"}), ("p1", {"overall": "right"})):
        assert client.post("/ratings", json={**GOOD_RATING, "prompt": prompt, "choices": choices}).status_code == 201
    summary = client.get("/ratings/summary").json()
    assert (summary["rated_pairs"], summary["ratings"], summary["criteria_rated"]) == (2, 3, 2)
    assert summary["min_prompts_for_interval"] == 10
    assert {row["criterion"]: (row["units"], row["small_sample"]) for row in summary["pairs"]} == {
        "impact_realism": (1, True), "overall": (2, True)}
    for k in range(2, 10):
        client.post("/ratings", json={**GOOD_RATING, "prompt": f"p{k}", "choices": {"overall": "left"}})
    summary = client.get("/ratings/summary").json()
    assert (summary["rated_pairs"], summary["ratings"]) == (10, 11)
    assert {row["criterion"]: (row["units"], row["small_sample"]) for row in summary["pairs"]} == {
        "impact_realism": (1, True), "overall": (10, False)}


def test_the_studio_page_is_served_with_every_asset_and_nothing_from_the_internet(client):
    """Guards a studio that needs a CDN (blank offline) or a missing packaged asset."""
    assert client.get("/studio", follow_redirects=False).headers["location"] == "/studio/"
    page = client.get("/studio/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("studio.js", "studio.css"):
        assert client.get(f"/studio/{asset}").status_code == 200
    for text in (page.text, client.get("/studio/studio.js").text, client.get("/studio/studio.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_a_rater_rating_the_same_two_videos_again_is_a_409_and_stores_nothing(client, tmp_path):
    """Guards the same `POST /ratings` body counted twice (a walk-through's script: `rated_pairs 2`, `losses 2`,
    `sign_test_p 0.5` from one judgement of one pair of videos): the rater's second rating of the same systems at
    the same scales, either side, on the same prompt and seed (and criterion), is a 409 and stores nothing; another
    rater, seed, scale or criterion is a new rating, and so is each of raters without a name."""
    first = client.post("/ratings", json=GOOD_RATING)
    assert first.status_code == 201
    before = client.get("/ratings.csv").text
    swapped = {**GOOD_RATING, "left": GOOD_RATING["right"], "right": GOOD_RATING["left"]}
    for body, said in ((GOOD_RATING, "base against a@0.5"), (swapped, "a@0.5 against base")):
        again = client.post("/ratings", json=body)
        assert again.status_code == 409, again.text
        assert again.json()["error"].startswith(f"ana has rated {said} on this prompt and seed already (impact_realism, "
                                                "overall; a verdict on the same two videos again is no new evidence)")
    assert client.get("/ratings.csv").text == before
    for change in ({"rater": "bo"}, {"seed": 4}, {"right": {"adapter": "a", "adapter_scale": 1.0}},
                   {"choices": {"prompt_adherence": "left"}}):  # another criterion of the same videos: new evidence
        assert client.post("/ratings", json={**GOOD_RATING, **change}).status_code == 201, change
    for _ in range(2):  # raters without a name are not told apart: each kept
        assert client.post("/ratings", json={**GOOD_RATING, "rater": "", "seed": 9}).status_code == 201
