"""`slapgen ratings`: the web studio's ratings store (the one the service writes: SLAP_DATABASE_URL, else
SLAP_DATA_DIR/ratings.sqlite) by model, and giving ratings stored before ratings recorded their model the model
that made them, so that its server's summary counts them (`RatingStore.assign_model`).

Neither command creates a SQLite file where there is none yet (with SLAP_DATABASE_URL the store is migrated on open,
as the service and `slapgen campaign` do)."""

from __future__ import annotations

from slapgen.errors import RequestError, closest_name_hint
from slapgen.serving.ratings import RATINGS_FILE, RatingStore
from slapgen.serving.settings import SlapSettings

UNRECORDED = "no model recorded (stored before ratings recorded their model)"
MAX_MODEL_NAME = 200  # a hub id or a folder's name, as /info gives it


def verdicts(count: int) -> str:
    return f"{count} verdict{'s' * (count != 1)}"


def _existing_store(settings: SlapSettings) -> RatingStore | None:
    """The store the service writes, or None where there is none yet (no database URL and no ratings file)."""
    database = settings.existing_store_database(RATINGS_FILE)
    return RatingStore(database) if database is not None else None


def rating_model_lines(settings: SlapSettings) -> list[str]:
    """`slapgen ratings list`: verdicts per model (one rated pair gives one per criterion), by name, then those
    with no model recorded and the command that gives them theirs; none when the store holds no rating."""
    store = _existing_store(settings)
    lines = []
    for model, count in store.model_counts() if store is not None else []:
        if model is None:
            lines.append(f"{UNRECORDED}: {verdicts(count)}; no summary counts them until `slapgen ratings "
                         "assign-model MODEL` gives them the model that made them")
        else:
            lines.append(f"{model}: {verdicts(count)}")
    return lines


def assign_ratings_model(settings: SlapSettings, model: str, recorded: str | None, merge: bool = False) -> str:
    """`slapgen ratings assign-model MODEL [--from RECORDED] [--yes]`: record MODEL as the model of the ratings with no
    model recorded (or recorded as RECORDED, to move them); returns the sentence to print. Assigning again changes
    nothing. An unknown RECORDED is a RequestError naming the models the store holds; so is a MODEL that has ratings
    already, unless `merge` (--yes): merged, they cannot be told apart again, so a mistake could not be mended."""
    model = model.strip()
    if not model or len(model) > MAX_MODEL_NAME or not model.isprintable():
        raise RequestError(f"MODEL must be the served model's name as /info gives it (1-{MAX_MODEL_NAME} printable "
                           f"characters), got {model[:MAX_MODEL_NAME]!r}", field="model")
    where = settings.where_ratings_are()
    store = _existing_store(settings)
    counts = dict(store.model_counts()) if store is not None else {}
    named = sorted(name for name in counts if name is not None)
    if recorded is not None and recorded not in counts:
        held = f"the models there are {', '.join(named)}" if named else "no rating there records a model"
        raise RequestError(f"no rating of {recorded} in {where}{closest_name_hint(recorded, named)}; {held}",
                           field="from")
    if not counts:
        return f"no ratings in {where}: nothing to assign"
    if recorded is None and None not in counts:
        return f"every rating in {where} records its model: nothing to assign"
    what = "with no model recorded" if recorded is None else f"recorded as {recorded}"
    if counts.get(model) and model != recorded and not merge:
        raise RequestError(f"{model} has {verdicts(counts[model])} in {where} already: the {verdicts(counts[recorded])} "
                           f"{what} would be merged with them, and no command could part them again; add --yes if "
                           f"{model} made them", field="model")
    changed = store.assign_model(model, recorded)
    note = "" if model in counts else (f"; no other rating there was {model}'s: check it is the name a server of "
                                       f"that model gives in /info's `model`, or mend it with --from {model}")
    return f"{verdicts(changed)} {what} now count as {model}'s, in {where}{note}"
