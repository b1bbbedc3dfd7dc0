"""`slapgen ratings list` and `slapgen ratings assign-model`, in process on the store the service writes."""

from __future__ import annotations

from sqlalchemy import insert

from slapgen.serving.ratings import RatingStore, ratings, summarise
from trainer.cli import main


def _rating(rater: str, choice: str = "left") -> dict:
    return {"rater": rater, "criterion": "overall", "choice": choice, "left_system": "base", "left_scale": 1.0,
            "right_system": "lora", "right_scale": 1.0, "prompt": "a slap", "seed": 1}


def test_ratings_list_and_assign_model_on_the_services_store(monkeypatch, tmp_path, capsys, database_url):
    """Guards the ratings an upgrade left without a model (stored before ratings recorded it) staying out of every
    summary with no way back: `ratings list` counts verdicts per model and names the command for the unrecorded
    ones, `assign-model MODEL` gives them MODEL (after which the summary of MODEL is `summarise` of all of them),
    assigning again changes nothing, a model no other rating has is said as a possible typo that `--from` mends,
    an unknown `--from` is one sentence naming the models there, and assigning to a model that has ratings already
    (merging two lots no command could part again) asks for --yes and changes nothing without it. Each line names the store: the SQLite file
    as an absolute path, or the database; neither command creates a store where there is none."""
    from slapgen.database import shown_url
    from slapgen.serving.settings import load_settings

    data = tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLAP_DATA_DIR", "data")  # relative, as a shell may set it
    monkeypatch.delenv("SLAP_DATABASE_URL", raising=False)
    sqlite_file = f"{data / 'ratings.sqlite'} (SLAP_DATABASE_URL is unset)"
    assert main(["ratings", "list"]) == 0 and main(["ratings", "assign-model", "tiny"]) == 0
    assert capsys.readouterr().out == (f"no studio ratings in {sqlite_file} (a campaign's ratings: `slapgen campaign list`)\n"
                                       f"no ratings in {sqlite_file}: nothing to assign\n")
    assert not data.exists()

    monkeypatch.setenv("SLAP_DATABASE_URL", database_url)
    where = shown_url(load_settings().database_url)
    store = RatingStore(database_url)
    store.add([_rating("ana"), _rating("ben", "tie")], "tiny")
    store.add([_rating("wan", "right")], "tiny-wan")
    with store._engine.begin() as db:  # stored before ratings recorded their model
        db.execute(insert(ratings).values([{**_rating(rater, "right"), "model": None} for rater in ("x", "y", "z")]))
    assert main(["ratings", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"studio ratings in {where}, per model:",
        "  tiny: 2 verdicts",
        "  tiny-wan: 1 verdict",
        "  no model recorded (stored before ratings recorded their model): 3 verdicts; no summary counts them until "
        "`slapgen ratings assign-model MODEL` gives them the model that made them",
    ]

    # tiny has ratings already: merged, the two lots could never be parted, so it asks first and changes nothing.
    assert main(["ratings", "assign-model", "tiny"]) == 2
    assert capsys.readouterr().err == (
        f"slapgen ratings: tiny has 2 verdicts in {where} already: the 3 verdicts with no model recorded would be "
        "merged with them, and no command could part them again; add --yes if tiny made them\n")
    assert [row["model"] for row in store.all()].count(None) == 3
    assert main(["ratings", "assign-model", "tiyn"]) == 0  # a typo: said, and mendable
    assert capsys.readouterr().out == (
        f"3 verdicts with no model recorded now count as tiyn's, in {where}; no other rating there was tiyn's: check it "
        "is the name a server of that model gives in /info's `model`, or mend it with --from tiyn\n")
    assert main(["ratings", "assign-model", "tiny", "--from", "tiyn", "--yes"]) == 0
    assert capsys.readouterr().out == f"3 verdicts recorded as tiyn now count as tiny's, in {where}\n"
    assert main(["ratings", "assign-model", "tiny"]) == 0
    assert capsys.readouterr().out == f"every rating in {where} records its model: nothing to assign\n"
    tiny_rows = [row for row in store.all() if row["model"] == "tiny"]
    assert len(tiny_rows) == 5 and store.summary("tiny") == {
        "model": "tiny", **summarise(tiny_rows), "other_models": [{"model": "tiny-wan", "ratings": 1}]}

    assert main(["ratings", "assign-model", "tiny", "--from", "tiny-wn"]) == 2
    assert capsys.readouterr().err == (f"slapgen ratings: no rating of tiny-wn in {where} (did you mean tiny-wan?); the "
                                       "models there are tiny, tiny-wan\n")
    assert main(["ratings", "assign-model", " "]) == 2
    assert "MODEL must be the served model's name as /info gives it" in capsys.readouterr().err
    assert [row["model"] for row in store.all()] == ["tiny", "tiny", "tiny-wan", "tiny", "tiny", "tiny"]
