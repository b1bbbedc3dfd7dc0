"""Blind A/B ratings from the web studio, stored in the service's database (`slapgen.database`:
`SLAP_DATABASE_URL`, else the SQLite file `SLAP_DATA_DIR/ratings.sqlite`).

A rating says, for one criterion, which of two videos made from the same prompt and seed was better:
the one shown left, the one shown right, or neither. The store keeps which system was on which side
(the page randomises sides and hides the systems from the rater), so nothing is lost and the summary
can be recomputed. Every write is one transaction (in WAL mode on SQLite): several raters (and several
workers, or replicas on one PostgreSQL) write at once safely, and a restart loses nothing.

The summary is computed with `slapgen.evaluation.stats`, the same code `slapgen eval` uses for its
automatic A/B against the base model: the outcome of each rating is read from the point of view of
the pair's first system (names sorted), and the bootstrap resamples prompts.

Each rating records the model that made its videos (`model`, as /info names it): servers of two models can
share one store, and a summary is of one model's ratings (tiny-wan's `base` is not tiny's). Ratings of
other models, and those written before ratings recorded their model, are counted apart, never mixed in;
`slapgen ratings assign-model` gives the latter the model that made them (`assign_model`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from sqlalchemy import (BigInteger, Column, Double, Integer, MetaData, Table, Text, and_, func, insert, or_, select,
                        update)

from slapgen.database import lock_for_writing, open_store
from slapgen.errors import RatingConflictError
from slapgen.names import CRITERIA
from slapgen.csv_cells import inert_csv
from slapgen.evaluation.stats import LOSS, TIE, WIN, Comparison, win_rate
from slapgen.timing import iso_utc

RATINGS_FILE = "ratings.sqlite"  # in SLAP_DATA_DIR, when SLAP_DATABASE_URL is unset
CHOICES = ("left", "right", "tie")
# Below this many rated prompts a pair's bootstrap interval says little (with one prompt it is a single
# point, "100% - 100%"): the summary flags such rows and the studio shows a warning instead of the interval.
MIN_PROMPTS_FOR_INTERVAL = 10
# What a rater's submission gives each row (`RatingRequest.rows`); the store adds the rest.
RATED_COLUMNS = ("rater", "criterion", "choice", "left_system", "left_scale", "right_system", "right_scale", "prompt",
                 "seed")
# `model` last: a spreadsheet reading the columns before it by position reads them as before.
CSV_COLUMNS = ("id", "created_at", *RATED_COLUMNS, "model")


# The table as its newest migration (slapgen/migrations/versions/ratings_*) leaves it.
ratings = Table(
    "ratings", MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=True), Column("created_at", Double),
    Column("rater", Text), Column("criterion", Text), Column("choice", Text), Column("left_system", Text),
    Column("left_scale", Double), Column("right_system", Text), Column("right_scale", Double),
    Column("prompt", Text), Column("seed", BigInteger), Column("model", Text),
    sqlite_autoincrement=True,
)


class RatingStore:
    """`where`: the database (a URL, or an SQLite file's path)."""

    def __init__(self, where: Path | str):
        self._lock = threading.Lock()
        self._engine = open_store(where, "ratings")
        # Each model's last summary with the stamp (`_stamp`) of the ratings it read. Each GET /ratings/summary
        # computed it again (10 s and 3 GB for 20,000 rated prompts, any number of clients at once; a review's
        # find); one computes, the others wait for it.
        self._summary_lock = threading.Lock()
        self._summaries: dict[str, tuple[Stamp, dict]] = {}  # per model
        # ... and each group's row of it, per model (`summarise`'s memo): a new rating changes one group, and every
        # group's bootstrap was run again (1.6 s at 8,650 ratings of 2,213 groups in a soak, at every new rating).
        self._group_rows: dict[str, dict] = {}

    def add(self, rows: list[dict], model: str) -> list[int]:
        """Store the ratings of one submission (one per criterion) of videos `model` made, all or nothing;
        returns their ids. RatingConflictError when its named rater has rated these two videos (the systems at their
        scales, either side, the prompt and seed) on one of its criteria already: the same body posted twice counted
        as two verdicts. Raters without a name are not told apart, so theirs are all kept. The check and the insert are
        one turn of the table's writers (`lock_for_writing`): two identical posts at the same moment on two workers or
        replicas store one."""
        now = time.time()
        with self._lock, self._engine.begin() as db:
            lock_for_writing(db, ratings)
            rated = sorted({criterion for (criterion,) in db.execute(select(ratings.c.criterion).where(
                *_same_videos(rows[0]), ratings.c.rater == rows[0]["rater"], ratings.c.model == model,
                ratings.c.criterion.in_([row["criterion"] for row in rows])))}) if rows and rows[0]["rater"] else []
            if rated:
                first = rows[0]
                raise RatingConflictError(
                    f"{first['rater']} has rated {system_label(first['left_system'], first['left_scale'])} "
                    f"against {system_label(first['right_system'], first['right_scale'])} on this prompt and seed "
                    f"already ({', '.join(rated)}; a verdict on the same two videos again is no new evidence); rate "
                    "another seed: the studio's “New seed every run” draws one", field="seed")
            return [db.execute(insert(ratings).values(
                created_at=now, model=model, **{column: row[column] for column in RATED_COLUMNS})).inserted_primary_key[0]
                for row in rows]

    def all(self) -> list[dict]:
        with self._engine.connect() as db:
            rows = db.execute(select(*(ratings.c[column] for column in CSV_COLUMNS)).order_by(ratings.c.id)).all()
        return [dict(zip(CSV_COLUMNS, row)) for row in rows]

    def csv(self) -> str:
        """Every rating as CSV, `created_at` in ISO 8601 (UTC): a spreadsheet shows seconds since the epoch as a
        number nobody reads, and the jobs API gives moments this way."""
        return inert_csv(({**row, "created_at": iso_utc(row["created_at"])} for row in self.all()), CSV_COLUMNS)

    def summary(self, model: str) -> dict:
        """The summary of `model`'s ratings (`summarise`), with how many verdicts of other models (or of no
        recorded model) it leaves out; the same dict while no rating is added or assigned: read it, never change it."""
        with self._summary_lock:
            cached = self._summaries.get(model)
            if cached is not None and cached[0] == self._stamp():  # a count per model, not every row, to learn nothing changed
                return cached[1]
            rows = self.all()
            stamp = _stamp_of(rows)  # of the rows read, not the query's above: a rating added between is never hidden
            if cached is None or cached[0] != stamp:
                left_out = Counter(row["model"] for row in rows if row["model"] != model)
                memo = self._group_rows.setdefault(model, {})
                cached = (stamp, {"model": model, **summarise([row for row in rows if row["model"] == model], memo),
                                  "other_models": [{"model": name, "ratings": count}
                                                   for name, count in sorted(left_out.items(), key=_named_first)]})
                self._summaries[model] = cached
            return cached[1]


    def _stamp(self) -> Stamp:
        """The ratings' stamp (`Stamp`) from one grouped count, without reading every row."""
        with self._engine.connect() as db:
            counted = db.execute(select(ratings.c.model, func.count(), func.max(ratings.c.id)).group_by(ratings.c.model))
            return tuple(sorted(((model, int(count), newest) for model, count, newest in counted), key=_named_first))

    def model_counts(self) -> list[tuple[str | None, int]]:
        """Verdicts per model, by name, then those stored before ratings recorded their model (None)."""
        return [(model, count) for model, count, _ in self._stamp()]  # the stamp is in that order

    def assign_model(self, model: str, recorded: str | None = None) -> int:
        """Record `model` as the model of the ratings recorded as `recorded` (None: those stored before ratings
        recorded their model, which no summary counts until then); returns how many changed."""
        where = ratings.c.model.is_(None) if recorded is None else ratings.c.model == recorded
        with self._lock, self._engine.begin() as db:
            return db.execute(update(ratings).where(where).values(model=model)).rowcount


# Per model (None: not recorded), sorted: (model, ratings, newest id). Ratings are only added, or moved to another
# model (`assign_model`), so an equal stamp is the same ratings: a move changes two models' counts or ids.
Stamp = tuple[tuple[str | None, int, int], ...]


def _stamp_of(rows: list[dict]) -> Stamp:
    """`RatingStore._stamp` of `rows` (`RatingStore.all`'s, ordered by id)."""
    counts: Counter = Counter(row["model"] for row in rows)
    newest = {row["model"]: row["id"] for row in rows}  # the last row of each model has its largest id
    return tuple(sorted(((model, count, newest[model]) for model, count in counts.items()), key=_named_first))


def _named_first(item: tuple) -> tuple[bool, str]:
    """Other models by name, then the ratings written before ratings recorded their model (None)."""
    return item[0] is None, item[0] or ""


def _same_videos(row: dict) -> list:
    """Conditions on the ratings table for a rating of the same two videos as `row`: its systems at their scales,
    on either side, and its prompt and seed."""
    def side(prefix: str, system: str, scale: float | None):
        column = ratings.c[f"{prefix}_scale"]
        return and_(ratings.c[f"{prefix}_system"] == system, column.is_(None) if scale is None else column == scale)

    left, right = (row["left_system"], row["left_scale"]), (row["right_system"], row["right_scale"])
    return [ratings.c.prompt == row["prompt"], ratings.c.seed == row["seed"],
            or_(and_(side("left", *left), side("right", *right)), and_(side("left", *right), side("right", *left)))]


def system_label(system: str, scale: float | None) -> str:
    """`base`, `NAME`, or `NAME@SCALE` when the adapter ran at another scale than 1 (base's scale: None, or 1.0 in
    rows stored before it was left empty)."""
    return system if system == "base" or scale == 1.0 else f"{system}@{scale:g}"


def rated_pairs(ratings: list[dict]) -> int:
    """How many blind pairs were rated: one `POST /ratings` stores one row per criterion, all with the
    same time, rater, systems, prompt and seed (`RatingStore.add` stamps them with one clock reading)."""
    keys = ("created_at", "rater", "left_system", "left_scale", "right_system", "right_scale", "prompt", "seed")
    return len({tuple(rating[key] for key in keys) for rating in ratings})


def summarise(ratings: list[dict], memo: dict | None = None) -> dict:
    """Per pair of systems and criterion: the first system's win rate (ties half) with its 95% bootstrap
    interval over prompts and the sign test, from `slapgen.evaluation.stats`; `small_sample` when fewer
    than MIN_PROMPTS_FOR_INTERVAL prompts were rated. `ratings` counts verdicts (one per criterion),
    `rated_pairs` the blind pairs they came from. `memo`: each group's comparisons and row from the call before,
    reused while its comparisons are the same (a group's row depends on them alone: its bootstrap is seeded), and
    left holding this call's groups only."""
    grouped: dict[tuple[str, str, str], list[Comparison]] = defaultdict(list)
    for rating in ratings:
        left = system_label(rating["left_system"], rating["left_scale"])
        right = system_label(rating["right_system"], rating["right_scale"])
        if left == right:
            continue  # a system against itself says nothing about either
        first, second = sorted((left, right))
        winner = {"left": left, "right": right, "tie": None}[rating["choice"]]
        outcome = TIE if winner is None else (WIN if winner == first else LOSS)
        grouped[(first, second, rating["criterion"])].append(Comparison(unit=rating["prompt"], outcome=outcome))
    rows, groups = [], {}
    for (first, second, criterion), comparisons in sorted(grouped.items()):
        key, seen = (first, second, criterion), tuple(comparisons)
        if memo is not None and (kept := memo.get(key)) is not None and kept[0] == seen:
            row = kept[1]
        else:
            rate = win_rate(comparisons)
            row = {"systems": [first, second], "criterion": criterion, **rate.to_json(),
                   "small_sample": rate.units < MIN_PROMPTS_FOR_INTERVAL}
        groups[key] = (seen, row)
        rows.append(row)
    if memo is not None:
        memo.clear()
        memo.update(groups)
    return {"criteria": list(CRITERIA), "ratings": len(ratings), "rated_pairs": rated_pairs(ratings),
            "criteria_rated": len({rating["criterion"] for rating in ratings}),
            "min_prompts_for_interval": MIN_PROMPTS_FOR_INTERVAL, "pairs": rows}
