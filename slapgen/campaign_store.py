"""Rating campaigns in the service's data store (`SLAP_DATA_DIR`): many systems' videos made from the
same prompts and seeds, blind pairs shown to raters, and their verdicts.

Layout: the tables in the service's database (`slapgen.database`: `SLAP_DATABASE_URL`, else the SQLite
file `DATA/campaigns.sqlite`; one transaction per submission, as `ratings.RatingStore`) and
`DATA/campaigns/NAME/TOKEN.mp4`, the videos copied in at creation (replicas share the folder). A
video is named by a random token, so its URL says nothing of its system, and the service serves
only files the database names inside the campaign's folder: never a path a client wrote.

A campaign is deleted (`delete`, only from the command line, where the data is) rows first, in one
transaction, then its folder: renamed to a hidden `.NAME.TOKEN.deleted` and removed. A crash before the
commit leaves the campaign whole, one after it an unlisted folder (a later delete clears hidden ones).

A pair is issued to one rater (`pair_id`, random) and answered once: the answer is an update of the
pair's `answered_at` guarded by `answered_at IS NULL` in the same transaction as its verdicts, so two
concurrent answers store one and the other is a conflict. A rater who asks again before answering
gets the same pair back, also when two requests race from two replicas: the database holds at most
one open pair per rater (a unique partial index), and the request whose insert it refuses returns the
other's pair. Repeats (the same pair and item shown again, sides swapped) are issued now
and then to measure each rater's consistency; they are kept out of the ranking.

No HTTP here (the routes are `slapgen.serving.campaign_routes`), so `slapgen campaign create` writes
through the same class (and migrates the schema first, as the service does). `CampaignStore` is the only
code that knows the storage.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import (Column, Double, Index, Integer, MetaData, Table, Text, UniqueConstraint, and_, delete,
                        distinct, func, insert, select, text, update)
from sqlalchemy.exc import IntegrityError

from slapgen.database import lock_for_writing, open_store

from slapgen.errors import (CampaignConflictError, CampaignError, CampaignNotFoundError, CampaignRatedError,
                            shown_name)
from slapgen.csv_cells import inert_csv
from slapgen.names import NAME_PATTERN, NAME_RULE
from slapgen.timing import iso_utc

CAMPAIGN_NAME_PATTERN = NAME_PATTERN  # a URL segment and a folder name as is
VIDEO_TOKEN_PATTERN = re.compile(r"[0-9a-f]{1,64}")  # `secrets.token_hex`: a token outside it names no video
VERDICT_COLUMNS = ("id", "created_at", "rater", "criterion", "choice", "preferred", "left_system", "right_system",
                   "prompt_index", "prompt", "seed", "pair_id", "repeat")
# The tables as their newest migration (slapgen/migrations/versions/campaigns_*) leaves them.
_metadata = MetaData()
campaigns = Table("campaigns", _metadata, Column("name", Text, primary_key=True), Column("created_at", Double),
                  Column("spec", Text))
videos = Table("videos", _metadata, Column("token", Text, primary_key=True), Column("campaign", Text),
               Column("system", Text), Column("item", Integer), Column("file", Text),
               UniqueConstraint("campaign", "system", "item"))
pairs = Table("pairs", _metadata, Column("pair_id", Text, primary_key=True), Column("campaign", Text),
              Column("rater", Text), Column("left_system", Text), Column("right_system", Text),
              Column("item", Integer), Column("repeat", Integer), Column("issued_at", Double),
              Column("answered_at", Double))
# A rating, as a budget, `slapgen campaign list` and a rater's answered pairs count them: an answered pair that
# is not a repeat (a pair shown again to measure the rater's consistency).
RATING_CONDITIONS = (pairs.c.answered_at.is_not(None), pairs.c.repeat == 0)
# One open pair per rater (campaigns_0002): what makes two concurrent `GET /pair` issue one pair.
Index("pairs_one_open_per_rater", pairs.c.campaign, pairs.c.rater, unique=True,
      sqlite_where=text("answered_at IS NULL"), postgresql_where=text("answered_at IS NULL"))
verdicts_table = Table("verdicts", _metadata, Column("id", Integer, primary_key=True, autoincrement=True),
                 Column("campaign", Text), Column("pair_id", Text), Column("rater", Text), Column("criterion", Text),
                 Column("choice", Text), Column("created_at", Double), sqlite_autoincrement=True)


def check_campaign_name(name: str) -> str:
    if not isinstance(name, str) or not CAMPAIGN_NAME_PATTERN.fullmatch(name):
        raise CampaignError(f"campaign name {name!r} must be {NAME_RULE}", field="name")
    return name


@dataclass(frozen=True)
class Item:
    """One prompt and seed every system of the campaign has a video of."""
    prompt_index: int
    prompt: str
    seed: int


def prompt_count(items: list[Item]) -> int:
    """The prompts of a campaign's items (its seeds of one prompt are one): what separating systems needs."""
    return len({item.prompt_index for item in items})


@dataclass
class CampaignSpec:
    """What `slapgen campaign create` makes: every (system, item) has a video file to copy in."""
    name: str
    systems: list[str]
    items: list[Item]
    criteria: list[str]
    videos: dict[tuple[str, int], Path]  # (system, item index) -> mp4 to copy
    budget: int | None = None  # ratings (RATING_CONDITIONS) after which the campaign is done and issues no new pair
    sources: list[str] = field(default_factory=list)
    metric_directions: dict[str, bool] = field(default_factory=dict)  # metric -> higher is better
    system_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # system -> metric -> value
    video_scores: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)  # metric -> (system, item) -> value
    metrics_left_out: dict[str, str] = field(default_factory=dict)  # metric -> why its numbers do not compare
    # system -> its LoRA file as eval.json names it (None: the base model); what serving the winner takes
    adapters: dict[str, str | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what `campaign create` says of the plan (not stored)

    def to_json(self) -> dict:
        return {"systems": self.systems, "items": [vars(item) for item in self.items], "criteria": self.criteria,
                "budget": self.budget, "sources": self.sources, "metric_directions": self.metric_directions,
                "system_scores": self.system_scores,
                "video_scores": {metric: [[s, i, v] for (s, i), v in values.items()]
                                 for metric, values in self.video_scores.items()},
                "metrics_left_out": self.metrics_left_out, "adapters": self.adapters}


@dataclass(frozen=True)
class Campaign:
    """A stored campaign as the routes and the leaderboard read it."""
    name: str
    created_at: float
    systems: list[str]
    items: list[Item]
    criteria: list[str]
    budget: int | None
    sources: list[str]
    metric_directions: dict[str, bool]
    system_scores: dict[str, dict[str, float]]
    video_scores: dict[str, dict[tuple[str, int], float]]
    metrics_left_out: dict[str, str]
    adapters: dict[str, str | None]  # a system missing: a campaign stored before campaigns recorded them

    @classmethod
    def from_row(cls, name: str, created_at: float, spec: str) -> "Campaign":
        tree = json.loads(spec)
        return cls(name=name, created_at=created_at, systems=tree["systems"],
                   items=[Item(**item) for item in tree["items"]], criteria=tree["criteria"], budget=tree["budget"],
                   sources=tree["sources"], metric_directions=tree["metric_directions"],
                   system_scores=tree["system_scores"],
                   video_scores={metric: {(s, i): v for s, i, v in values}
                                 for metric, values in tree["video_scores"].items()},
                   metrics_left_out=tree.get("metrics_left_out", {}),  # campaigns stored before it had none
                   adapters=tree.get("adapters", {}))


@dataclass(frozen=True)
class DeletedCampaign:
    """What deleting a campaign removed."""
    name: str
    videos: int
    pairs: int  # issued, answered or not, repeats included
    ratings: int  # answered pairs, repeats excluded (as `overview` and a budget count them)
    raters: int  # who answered at least one
    repeats: int = 0  # answered repeats: pairs shown again to measure a rater's consistency


def ratings_phrase(ratings: int, repeats: int, raters: int) -> str:
    """"3 ratings (and 1 repeat of a pair shown again) from 2 raters": what deleting a campaign loses or lost."""
    again = f" (and {repeats} repeat{'s' * (repeats != 1)} of a pair shown again)" if repeats else ""
    return f"{ratings} rating{'s' * (ratings != 1)}{again} from {raters} rater{'s' * (raters != 1)}"


@dataclass(frozen=True)
class IssuedPair:
    pair_id: str
    rater: str
    left: str  # system names: never sent to a rater
    right: str
    item: int
    repeat: bool
    left_video: str  # video tokens
    right_video: str


CAMPAIGNS_FILE = "campaigns.sqlite"  # in the data folder, where no database URL is given


class CampaignStore:
    """`data_dir`: the campaigns' videos (DATA/campaigns/); `database`: a URL (default: the SQLite file
    DATA/campaigns.sqlite)."""

    def __init__(self, data_dir: Path, database: str | None = None):
        self.data_dir = Path(data_dir)
        self.videos_dir = self.data_dir / "campaigns"
        self.videos_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._engine = open_store(database or self.data_dir / CAMPAIGNS_FILE, "campaigns")

    def _read(self, query) -> list[tuple]:
        with self._engine.connect() as db:
            return [tuple(row) for row in db.execute(query).all()]

    # -- campaigns ---------------------------------------------------------------------------------

    def create(self, spec: CampaignSpec) -> Campaign:
        """Copy the videos in and store the campaign, all or nothing: the videos are staged in a hidden
        folder renamed into place inside the transaction that inserts the rows, so a failure at any
        point (a name taken meanwhile, a file that cannot be read, a full disk) leaves nothing."""
        check_campaign_name(spec.name)
        if self.exists(spec.name):
            raise CampaignConflictError(f"campaign {spec.name} exists already; pick another name", field="name")
        target = self.videos_dir / spec.name
        staging = self.videos_dir / f".{spec.name}.{secrets.token_hex(4)}.tmp"
        staging.mkdir()
        try:
            rows = []
            for (system, item), source in sorted(spec.videos.items()):
                token = secrets.token_hex(12)
                shutil.copyfile(source, staging / f"{token}.mp4")
                rows.append({"token": token, "campaign": spec.name, "system": system, "item": item,
                             "file": f"{token}.mp4"})
            with self._lock, self._engine.begin() as db:
                try:
                    db.execute(insert(campaigns).values(name=spec.name, created_at=time.time(),
                                                        spec=json.dumps(spec.to_json())))
                except IntegrityError:
                    raise CampaignConflictError(f"campaign {spec.name} exists already; pick another name",
                                                field="name") from None
                db.execute(insert(videos), rows)
                if target.exists():  # left by a campaign deleted by hand from the database only
                    raise CampaignConflictError(f"{target} exists already; remove it or pick another name",
                                                field="name")
                staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if target.exists() and not self.exists(spec.name):
                shutil.rmtree(target, ignore_errors=True)
            raise
        return self.get(spec.name)

    def exists(self, name: str) -> bool:
        return bool(self._read(select(1).select_from(campaigns).where(campaigns.c.name == name)))

    def get(self, name: str) -> Campaign:
        # A name no campaign can have is not looked up: PostgreSQL refuses a NUL in a query's text (a 500 with a
        # traceback, for any client's `/campaigns/c%00/...`).
        rows = self._read(select(campaigns.c.name, campaigns.c.created_at, campaigns.c.spec).where(
            campaigns.c.name == name)) if CAMPAIGN_NAME_PATTERN.fullmatch(name) else []
        if not rows:
            raise CampaignNotFoundError(f"no campaign named {shown_name(name)}; GET /campaigns lists them", field="name")
        return Campaign.from_row(*rows[0])

    def overview(self) -> list[dict]:
        """Every campaign with its progress: ratings answered (per criterion, repeats excluded), raters."""
        counts = {name: (answered, raters) for name, answered, raters in self._read(
            select(pairs.c.campaign, func.count(), func.count(distinct(pairs.c.rater)))
            .where(*RATING_CONDITIONS).group_by(pairs.c.campaign))}
        out = []
        for name, created_at, spec in self._read(
                select(campaigns.c.name, campaigns.c.created_at, campaigns.c.spec).order_by(campaigns.c.name)):
            campaign = Campaign.from_row(name, created_at, spec)
            answered, raters = counts.get(name, (0, 0))
            out.append({"name": name, "created_at": created_at, "systems": len(campaign.systems),
                        "items": len(campaign.items), "criteria": campaign.criteria, "ratings": answered,
                        "budget": campaign.budget, "raters": raters})
        return out

    def rating_count(self, name: str) -> int:
        """The ratings campaign `name` has (repeats excluded): what its budget counts and `overview` lists."""
        return self._read(select(func.count()).select_from(pairs).where(pairs.c.campaign == name, *RATING_CONDITIONS))[0][0]

    def budget_taken(self, name: str) -> tuple[int, int]:
        """(ratings given, pairs issued within OPEN_PAIR_HOLD_S and not answered yet) of campaign `name`, repeats
        excluded: what its budget counts (`_budget_taken`)."""
        return self._read(_budget_taken(name))[0]

    def delete(self, name: str, with_ratings: bool = False) -> DeletedCampaign:
        """Remove campaign `name`: its row, videos, pairs and verdicts in one transaction, then its copied
        videos. A campaign with ratings is kept (CampaignRatedError) unless `with_ratings`; the ratings are
        counted by the statement that deletes their pairs, inside the transaction, so one answered meanwhile
        is counted too (or finds its pair gone and is refused as answered). The folder goes only after the
        commit: a crash before it leaves the campaign whole and listed, one after it no campaign, only files."""
        with self._lock, self._engine.begin() as db:
            if db.execute(delete(campaigns).where(campaigns.c.name == name)).rowcount != 1:
                raise CampaignNotFoundError(f"no campaign named {name!r}", field="name")
            issued = db.execute(delete(pairs).where(pairs.c.campaign == name)
                                .returning(pairs.c.rater, pairs.c.answered_at, pairs.c.repeat)).all()
            answered = [(rater, repeat) for rater, answered_at, repeat in issued if answered_at is not None]
            # Counted as `list` counts them, repeats apart (a walk-through read 11 ratings here and 10 there).
            repeats = sum(1 for _, repeat in answered if repeat)
            ratings, raters = len(answered) - repeats, len({rater for rater, _ in answered})
            if answered and not with_ratings:  # raising rolls the transaction back: nothing is deleted
                raise CampaignRatedError(f"campaign {name} has {ratings_phrase(ratings, repeats, raters)}, which "
                                         "deleting it loses", ratings, raters)
            db.execute(delete(verdicts_table).where(verdicts_table.c.campaign == name))
            removed_videos = db.execute(delete(videos).where(videos.c.campaign == name)).rowcount
        self._discard_folder(name)
        return DeletedCampaign(name, removed_videos, len(issued), ratings, raters, repeats)

    def _discard_folder(self, name: str) -> None:
        """Remove a deleted campaign's folder: renamed first to a hidden name no campaign can have (a crash
        while removing leaves no half-empty NAME/ that would block a new campaign of that name), then removed
        with any such folder an earlier crash left."""
        folder = self.videos_dir / name
        if folder.is_dir():
            folder.rename(self.videos_dir / f".{name}.{secrets.token_hex(4)}.deleted")
        for leftover in self.videos_dir.glob(".*.deleted"):
            shutil.rmtree(leftover, ignore_errors=True)

    # -- videos ------------------------------------------------------------------------------------

    def video_tokens(self, name: str) -> dict[tuple[str, int], str]:
        return {(system, item): token for token, system, item in self._read(
            select(videos.c.token, videos.c.system, videos.c.item).where(videos.c.campaign == name))}

    def video_file(self, name: str, token: str) -> Path:
        """The mp4 of a video token, inside the campaign's folder (checked: never a path from outside)."""
        if not (CAMPAIGN_NAME_PATTERN.fullmatch(name) and self._read(select(campaigns.c.name).where(campaigns.c.name == name))):
            self.get(name)  # its sentence; a video or Range request does not read the campaign's spec
        rows = self._read(select(videos.c.file).where(videos.c.campaign == name, videos.c.token == token)) \
            if VIDEO_TOKEN_PATTERN.fullmatch(token) else []
        if not rows:
            raise CampaignNotFoundError(f"campaign {name!r} has no video {shown_name(token)}", field="video")
        folder = (self.videos_dir / name).resolve()
        path = (folder / rows[0][0]).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise CampaignNotFoundError(f"campaign {name!r} has no video {shown_name(token)}", field="video")
        return path

    # -- pairs and verdicts ------------------------------------------------------------------------

    def held_pairs(self, name: str, rater: str) -> list[tuple[str, str, int]]:
        """(left system, right system, item) of each pair other raters than `rater` hold: issued within
        OPEN_PAIR_HOLD_S, not answered yet, not a repeat."""
        return [tuple(row) for row in self._read(
            select(pairs.c.left_system, pairs.c.right_system, pairs.c.item).where(
                pairs.c.campaign == name, pairs.c.rater != rater, pairs.c.answered_at.is_(None), pairs.c.repeat == 0,
                pairs.c.issued_at >= time.time() - OPEN_PAIR_HOLD_S))]

    def open_pair(self, name: str, rater: str) -> IssuedPair | None:
        """The pair issued to `rater` and not answered yet, if any."""
        rows = self._read(select(pairs.c.pair_id).where(pairs.c.campaign == name, pairs.c.rater == rater,
                                                        pairs.c.answered_at.is_(None))
                          .order_by(pairs.c.issued_at).limit(1))
        return self.pair(name, rows[0][0]) if rows else None

    def issue_pair(self, name: str, rater: str, left: str, right: str, item: int, repeat: bool,
                   budget: int | None = None) -> IssuedPair | None:
        """Issue a pair to `rater`, or return the rater's open pair if they have one: the database allows one
        open pair per rater (a unique partial index), so of two requests racing from two replicas or workers
        one inserts and the other gets that pair. With `budget`, a pair that is not a repeat is issued only while
        the ratings given and the pairs open within OPEN_PAIR_HOLD_S leave room in it, counted in the inserting
        transaction as the only writer of the pairs (`lock_for_writing`): raters asking at once on several workers
        each passed a count taken before any of them inserted. None when there is no room."""
        pair_id = secrets.token_urlsafe(12)
        try:
            with self._lock, self._engine.begin() as db:
                if budget is not None and not repeat:
                    lock_for_writing(db, pairs)
                    if sum(db.execute(_budget_taken(name)).one()) >= budget:
                        return None
                db.execute(insert(pairs).values(pair_id=pair_id, campaign=name, rater=rater, left_system=left,
                                                right_system=right, item=item, repeat=int(repeat),
                                                issued_at=time.time(), answered_at=None))
        except IntegrityError:
            if (open_pair := self.open_pair(name, rater)) is None:
                raise  # not the one-open-pair rule (it would have left an open pair to return)
            return open_pair
        return self.pair(name, pair_id)

    def pair(self, name: str, pair_id: str) -> IssuedPair:
        left, right = videos.alias("l"), videos.alias("r")
        rows = self._read(
            select(pairs.c.pair_id, pairs.c.rater, pairs.c.left_system, pairs.c.right_system, pairs.c.item,
                   pairs.c.repeat, left.c.token, right.c.token)
            .join(left, and_(left.c.campaign == pairs.c.campaign, left.c.system == pairs.c.left_system,
                             left.c.item == pairs.c.item))
            .join(right, and_(right.c.campaign == pairs.c.campaign, right.c.system == pairs.c.right_system,
                              right.c.item == pairs.c.item))
            .where(pairs.c.campaign == name, pairs.c.pair_id == pair_id))
        if not rows:
            raise CampaignNotFoundError(f"campaign {name!r} has no pair {pair_id!r}; GET /campaigns/{name}/pair "
                                        "issues one", field="pair_id")
        pair_id, rater, left_system, right_system, item, repeat, left_video, right_video = rows[0]
        return IssuedPair(pair_id, rater, left_system, right_system, item, bool(repeat), left_video, right_video)

    def answer(self, name: str, pair_id: str, rater: str, verdicts: dict[str, str]) -> list[int]:
        """Store a rater's verdicts on an issued pair (one per criterion), all or nothing; returns their ids."""
        campaign = self.get(name)
        pair = self.pair(name, pair_id)
        if pair.rater != rater:
            raise CampaignError(f"pair {pair_id} was issued to another rater; ask GET /campaigns/{name}/pair for yours",
                                field="rater")
        unknown = sorted(set(verdicts) - set(campaign.criteria))
        if unknown:
            raise CampaignError(f"campaign {name} rates {', '.join(campaign.criteria)}, not {', '.join(unknown)}",
                                field="verdicts")
        missing = [c for c in campaign.criteria if c not in verdicts]
        if missing:
            raise CampaignError(f"a verdict is needed for every criterion; missing: {', '.join(missing)}",
                                field="verdicts")
        now = time.time()
        with self._lock, self._engine.begin() as db:
            # The guard and the verdicts are one transaction: of two concurrent answers (two workers, two
            # replicas) one updates the pair; the other waits for it, finds it answered and stores nothing.
            updated = db.execute(update(pairs).where(pairs.c.campaign == name, pairs.c.pair_id == pair_id,
                                                     pairs.c.answered_at.is_(None)).values(answered_at=now)).rowcount
            if updated != 1:
                raise CampaignConflictError(f"pair {pair_id} is answered already; ask GET "
                                            f"/campaigns/{name}/pair for the next one", field="pair_id")
            return [db.execute(insert(verdicts_table).values(
                campaign=name, pair_id=pair_id, rater=rater, criterion=criterion, choice=verdicts[criterion],
                created_at=now)).inserted_primary_key[0] for criterion in campaign.criteria]

    def verdicts(self, name: str) -> list[dict]:
        """Every verdict of the campaign, oldest first, with the systems each side showed."""
        campaign = self.get(name)
        v = verdicts_table
        rows = self._read(
            select(v.c.id, v.c.created_at, v.c.rater, v.c.criterion, v.c.choice, pairs.c.left_system,
                   pairs.c.right_system, pairs.c.item, v.c.pair_id, pairs.c.repeat)
            .join(pairs, pairs.c.pair_id == v.c.pair_id).where(v.c.campaign == name).order_by(v.c.id))
        out = []
        for id_, created_at, rater, criterion, choice, left, right, item, pair_id, repeat in rows:
            it = campaign.items[item]
            preferred = {"left": left, "right": right}.get(choice, "tie")
            out.append({"id": id_, "created_at": created_at, "rater": rater, "criterion": criterion, "choice": choice,
                        "preferred": preferred, "left_system": left, "right_system": right,
                        "prompt_index": it.prompt_index, "prompt": it.prompt, "seed": it.seed, "item": item,
                        "pair_id": pair_id, "repeat": bool(repeat)})
        return out

    def verdicts_csv(self, name: str) -> str:
        """`verdicts` as CSV, `created_at` in ISO 8601 (UTC), as `RatingStore.csv` writes it."""
        return inert_csv(({**row, "created_at": iso_utc(row["created_at"])} for row in self.verdicts(name)),
                         VERDICT_COLUMNS, extrasaction="ignore")


def _budget_taken(name: str):
    """The query of (ratings given, pairs open within OPEN_PAIR_HOLD_S) of campaign `name`, repeats excluded: the one
    count of a campaign's budget, for `next_pair_for`'s sentence and `issue_pair`'s check in its transaction."""
    answered = pairs.c.answered_at.is_not(None)
    return select(func.count().filter(answered),
                  func.count().filter(~answered, pairs.c.issued_at >= time.time() - OPEN_PAIR_HOLD_S)
                  ).select_from(pairs).where(pairs.c.campaign == name, pairs.c.repeat == 0)


# How long an issued, unanswered pair holds a place in its campaign's budget: raters asking together were each
# issued a pair while the answered ratings were under it (300 made-up raters rated a campaign of budget 18, an
# attack's find; honest raters starting together overran it too). A pair left longer frees its place, and can
# still be answered.
OPEN_PAIR_HOLD_S = 30 * 60
REPEAT_SHARE = 0.05  # share of pairs that repeat one the rater answered (sides swapped): their consistency


def pair_items(systems: list, items: list) -> int:
    """Every pair of systems on every prompt/seed item: the most ratings one rater can give, a campaign's default
    budget, and the round `next_pair_for` covers first within a budget of at most that."""
    return len(systems) * (len(systems) - 1) // 2 * len(items)


def verdicts_of(rows: list[dict], criterion: str, repeats: bool = False):
    """The stored verdicts on one criterion as `ranking.Verdict`s (bootstrap unit: the prompt, by its index)."""
    from slapgen.evaluation.ranking import Verdict

    return [Verdict(left=row["left_system"], right=row["right_system"], outcome=row["choice"], prompt=str(row["prompt_index"]),
                    seed=row["seed"], rater=row["rater"])
            for row in rows if row["criterion"] == criterion and (repeats or not row["repeat"])]


# (campaign, criterion, verdicts, newest verdict id) -> separated: raters asking between two ratings share one
# bootstrap; a campaign deleted and made again under its name has new ids. Per process, bounded.
_separation_memo: dict[tuple, bool] = {}
_separation_memo_lock = threading.Lock()


def every_criterion_separated(name: str, campaign: "Campaign", rows: list[dict]) -> bool:
    """Whether each criterion of the campaign is "separated" (`ranking.separated`, the leaderboard's rule)."""
    from slapgen.evaluation.ranking import separated

    if not rows:
        return False
    for criterion in campaign.criteria:
        key = (name, criterion, len(rows), rows[-1]["id"])
        with _separation_memo_lock:
            known = _separation_memo.get(key)
        if known is None:
            known = separated(verdicts_of(rows, criterion), campaign.systems)
            with _separation_memo_lock:
                if len(_separation_memo) > 1024:
                    _separation_memo.clear()
                _separation_memo[key] = known
        if not known:
            return False
    return True


def next_pair_for(store: CampaignStore, name: str, rater: str, generator,
                  repeat_share: float = REPEAT_SHARE) -> IssuedPair | str:
    """The pair to show `rater` next: the one they have open, else now and then a repeat of one they
    answered (sides swapped; `repeat_share` of the pairs), else `ranking.next_pair` on the campaign's first
    criterion (the pair expected to tell the most about the ranking; within a budget of one round, every pair on
    every item once, the pairs that round still lacks). Else the sentence why there is none: the
    campaign's budget is reached (pairs were issued and rated past it: 10 of a budget of 8 in a walk-through; an
    open pair is still answered, a rater's work is never refused), or held by pairs other raters have open (issued
    within OPEN_PAIR_HOLD_S), or every criterion separated its top system (the
    leaderboard's "separated": raters' time went on pairs that could not change the winner), or the rater has judged every pair on every item
    (and then no repeat either: one came now and then after "judged every pair", which read as a flip-flop)."""
    from slapgen.evaluation.ranking import Pair, next_pair

    campaign = store.get(name)
    if (open_pair := store.open_pair(name, rater)) is not None:
        return open_pair
    rated, held = store.budget_taken(name) if campaign.budget is not None else (0, 0)
    if campaign.budget is not None and rated >= campaign.budget:
        return f"{name} is done: its budget of {campaign.budget} ratings is reached ({rated} given)"
    if campaign.budget is not None and rated + held >= campaign.budget:  # said here; `issue_pair` holds it
        return (f"{name}'s budget of {campaign.budget} ratings is spoken for: {rated} given and {held} pair"
                f"{'s' * (held != 1)} with other raters, not answered yet; ask again later (a pair unanswered for "
                f"{OPEN_PAIR_HOLD_S // 60:g} minutes gives up its place)")
    rows = store.verdicts(name)
    if every_criterion_separated(name, campaign, rows):
        return (f"{name} is done: on every criterion its top system is separated from the second (its leaderboard "
                "names the winner); more ratings would not change who won")
    # The pairs the rater answered, oldest first, repeats excluded: in the verdicts read above (one row per criterion).
    # They were read again, one query per pair, on every request (200 ms at 120 answered pairs on SQLite).
    answered = list({row["pair_id"]: row for row in rows if row["rater"] == rater and not row["repeat"]}.values())
    item_index = {(str(item.prompt_index), item.seed): k for k, item in enumerate(campaign.items)}
    verdicts = verdicts_of(rows, campaign.criteria[0])
    one_round = campaign.budget is not None and campaign.budget <= pair_items(campaign.systems, campaign.items)
    item_keys = list(item_index)  # (prompt, seed) by item number
    held = [Pair(left, right, *item_keys[item]) for left, right, item in (store.held_pairs(name, rater) if one_round else ())]
    chosen = next_pair(verdicts, campaign.systems, list(item_index), rater, generator, one_round=one_round, held=held)
    if chosen is None:
        return f"{rater} has judged every pair of systems on every prompt and seed of {name}"
    if answered and generator.random() < repeat_share:
        again = answered[generator.integers(len(answered))]
        return store.issue_pair(name, rater, again["right_system"], again["left_system"], again["item"], repeat=True)
    issued = store.issue_pair(name, rater, chosen.left, chosen.right, item_index[(chosen.prompt, chosen.seed)],
                              repeat=False, budget=campaign.budget)
    if issued is None:  # taken meanwhile by raters asking at the same moment
        return (f"{name}'s budget of {campaign.budget} ratings is spoken for by pairs other raters have open; ask "
                f"again later (a pair unanswered for {OPEN_PAIR_HOLD_S // 60:g} minutes gives up its place)")
    return issued
