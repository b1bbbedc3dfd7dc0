"""`slapgen campaign create`, `list` and `delete`. Create: the videos of `slapgen eval` runs (EVAL_DIR/eval.json and
EVAL_DIR/videos/SYSTEM/pNNN-sSEED.mp4; a sweep writes one such folder per run, RUN/eval, and, with
generation metrics, one for the whole sweep in its own folder: the base model and every run, or with
--checkpoints every checkpoint that made videos, as RUN@STEP) turned into a rating campaign in the
service's data store.

Systems keep their eval names; a name found in several folders (every sweep run's adapter is `lora`)
becomes `RUN-NAME`, RUN the folder's name (its parent's when the folder is called `eval`). Every
system must have a video of every item (prompt and seed); the error lists what is missing. The
automatic metrics of eval.json (per system, and per video where eval scored each video) go with the
campaign so its leaderboard can say which one agrees with the raters; a metric whose definition differs
between the chosen systems (a held-out loss of two training objectives, a CLIP score of two CLIP
models) is left out, with the sentence the leaderboard gives for it (`comparable_metrics`).

List and delete read the same store create writes (SLAP_DATA_DIR, or SLAP_DATABASE_URL), through
`CampaignStore`; where no store exists yet they create none.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from slapgen.errors import CampaignError, CampaignNotFoundError, CampaignRatedError
from slapgen.names import CRITERIA, NAME_RULE
from slapgen.campaign_store import CAMPAIGN_NAME_PATTERN, CampaignSpec, Item, check_campaign_name, pair_items

DEFAULT_CRITERIA = ("overall",)
_VIDEO_FIELDS = ("system", "prompt", "seed", "path")
# Keys of a metric definition that describe one eval's inputs or caveats, not what its numbers measure.
# `ticft`: the sentence an eval adds when one of its systems is a TIC-FT adapter; `objectives` already says,
# per system, what its loss measures (two text-to-video systems stay comparable beside it).
_NOTES = ("warning", "text", "prompts_truncated", "prompt_tokens_read", "ticft")


def _source_label(folder: Path) -> str:
    named = folder.parent if folder.name == "eval" else folder
    return re.sub(r"[^a-z0-9_-]+", "-", named.resolve().name.lower()).strip("-")[:40] or "run"


def _sweep_makes_videos(folder: Path) -> bool | None:
    """Whether the sweep `folder` holds (its sweep.json) generates videos (it has generation metrics), or None
    when the folder holds no sweep. One this slapgen cannot read (damaged, or its run configs refused now: its
    rerun refuses it too) says so."""
    from trainer.errors import SweepError
    from trainer.sweep.folder import DEFINITION_FILE, read_definition

    if not (folder / DEFINITION_FILE).is_file():
        return None
    try:
        return read_definition(folder).evaluation is not None
    except SweepError as error:
        raise CampaignError(str(error)) from None


def _read_eval(folder: Path) -> dict:
    path = folder / "eval.json"
    if not folder.is_dir():  # a mistyped --from read "holds no eval.json"
        raise CampaignError(f"{folder} is not a folder{'' if folder.exists() else ' (no such path)'}: --from takes a "
                            "folder `slapgen eval` wrote, or a sweep's folder")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (makes_videos := _sweep_makes_videos(folder)) is not None:  # it read as if the folder were wrong
            if makes_videos:
                raise CampaignError(f"{folder} is a sweep whose videos are not all made yet (its eval.json is written "
                                    "once every run is scored): rerun the same sweep command to finish it") from None
            raise CampaignError(f"{folder} is a sweep that made no videos to rate (no generation metrics: held-out "
                                "loss only): `slapgen eval` its runs (--adapter NAME=RUN_FOLDER, one per run) and "
                                "create the campaign --from that eval's folder, or sweep again into a new --out with "
                                "--metrics loss,clip (or fvd, temporal)") from None
        raise CampaignError(f"{folder} holds no eval.json: --from takes a folder `slapgen eval` wrote, or a sweep's "
                            "folder (or a run's RUN/eval) when the sweep had generation metrics") from None
    except (OSError, ValueError) as error:
        raise CampaignError(f"{path} cannot be read as JSON ({error})") from None
    if not isinstance(result, dict) or not isinstance(result.get("videos"), list) or not result["videos"]:
        raise CampaignError(f"{path} lists no videos: run `slapgen eval` with a metric that generates them (clip, "
                            "fvd or temporal in --metrics; `--metrics loss` alone makes none)")
    return result


def _definition_of(definition: dict, system: str, folder: Path) -> dict:
    """What one system's value of a metric measures: its folder's definition without notes, the evaluation
    model's path as a resolved path (a sweep writes it relative to its folder) and, for a per-system
    `objectives` (the held-out loss: text-to-video or a TIC-FT layout), this system's entry."""
    meaning = {key: value for key, value in definition.items() if key not in _NOTES}
    model = meaning.get("model")
    if isinstance(model, str) and ((folder / model).exists() or Path(model).is_absolute()):
        meaning["model"] = str((folder / model).resolve())
    if isinstance(meaning.get("objectives"), dict):
        meaning["objectives"] = meaning["objectives"].get(system)
    return meaning


def _adapter_file(adapter, folder: Path) -> str | None:
    """A system's LoRA file from eval.json (`systems[NAME]["adapter"]`, absolute as eval writes it; a relative
    one read against the eval folder), for the leaderboard to name the file that serves the winner."""
    return str((folder / adapter).resolve()) if isinstance(adapter, str) and adapter else None


# Parts of a metric's definition that eval.json files written by older slapgen versions lack.
RECORDED_LATER = ("objective", "objectives", "latents", "frames", "size")


def comparable_metrics(definitions: dict[str, dict[str, dict]]) -> dict[str, str]:
    """The one rule for setting numbers side by side: a metric is comparable across systems when their
    definitions (`_definition_of`) are equal. `definitions`: metric -> system -> definition. Returns the
    metrics that are not, each with the sentence saying why (two systems and the first field that differs)."""
    left_out = {}
    for metric, by_system in definitions.items():
        if len(by_system) < 2:
            continue
        (first, reference), *others = sorted(by_system.items())
        other = next(((system, d) for system, d in others if d != reference), None)
        if other is None:
            continue
        system, meaning = other
        field = next(key for key in sorted(set(reference) | set(meaning)) if reference.get(key) != meaning.get(key))
        unrecorded = [name for name, definition in ((first, reference), (system, meaning)) if field not in definition]
        if unrecorded and field in RECORDED_LATER:  # an eval.json written before slapgen recorded this part
            left_out[metric] = (f"{metric} is left out: {unrecorded[0]}'s eval does not record its {field} (an eval "
                                 f"made by an older slapgen), so it cannot be compared with {system if unrecorded[0] == first else first}'s; "
                                 "run that eval again to compare them")
            continue
        left_out[metric] = (f"{metric} is left out: {first} and {system} have it defined differently ({field}: "
                            f"{reference.get(field)!r} against {meaning.get(field)!r}), so their numbers do not compare")
    return left_out


def plan_campaign(name: str, sources: list[Path], systems: list[str] | None = None,
                  criteria: list[str] | None = None, budget: int | None = None) -> CampaignSpec:
    """Everything `CampaignStore.create` needs, checked: names, every system's video of every item."""
    check_campaign_name(name)
    criteria = list(criteria or DEFAULT_CRITERIA)
    for criterion in criteria:
        if not CAMPAIGN_NAME_PATTERN.fullmatch(criterion):
            raise CampaignError(f"criterion {criterion!r} must be {NAME_RULE}")
        if (shared := _misspelt_criterion(criterion)) is not None:  # `overal` was a campaign's criterion for good
            raise CampaignError(f"criterion {criterion!r} is spelt like the studio's {shared!r}: use {shared} (names "
                                f"shared with the studio's ratings, {', '.join(CRITERIA)}, read alike), or a name "
                                "of your own that is not a near miss")
    if len(set(criteria)) != len(criteria):
        raise CampaignError("--criteria names a criterion twice")
    if budget is not None and budget < 1:
        raise CampaignError("--budget must be at least 1 rating")
    if not sources:
        raise CampaignError("name at least one eval folder with --from")
    folders = [Path(s) for s in sources]
    twice = next((folder for k, folder in enumerate(folders)
                  if folder.resolve() in [other.resolve() for other in folders[:k]]), None)
    if twice is not None:  # it read "system two-base has two videos of prompt 0 seed 1"
        raise CampaignError(f"--from names {twice} twice")
    results = [_read_eval(folder) for folder in folders]
    seen: dict[str, int] = {}
    for result in results:
        for system in {v.get("system") for v in result["videos"]}:
            seen[system] = seen.get(system, 0) + 1

    def final_name(folder: Path, system: str) -> str:
        return f"{_source_label(folder)}-{system}"[:64] if seen[system] > 1 else system

    # (final system) -> (prompt index, caption, seed) -> mp4; the scores alongside.
    files: dict[str, dict[tuple[int, str, int], Path]] = {}
    directions: dict[str, bool] = {}
    definitions: dict[str, dict[str, dict]] = {}  # metric -> final system -> what its value measures
    system_scores: dict[str, dict[str, float]] = {}
    video_scores: dict[str, dict[tuple[str, tuple], float]] = {}
    adapters: dict[str, str | None] = {}  # final system -> its LoRA file (None: the base model)
    settings: dict[str, dict] = {}  # final system -> the generation settings of its eval
    for folder, result in zip(folders, results):
        captions = {p["index"]: p["caption"] for p in result.get("prompts", [])}
        for metric, definition in result.get("metric_definitions", {}).items():
            directions[metric] = bool(definition.get("higher_is_better", True))
            for system in {v.get("system") for v in result["videos"]} | set(result.get("systems", {})):
                if system in seen:
                    definitions.setdefault(metric, {})[final_name(folder, system)] = \
                        _definition_of(definition, system, folder)
        for video in result["videos"]:
            if any(key not in video for key in _VIDEO_FIELDS) or video["prompt"] not in captions:
                raise CampaignError(f"{folder / 'eval.json'} has a video entry without system, prompt, seed and path")
            system = final_name(folder, video["system"])
            key = (video["prompt"], captions[video["prompt"]], video["seed"])
            if system in files and key in files[system]:
                raise CampaignError(f"system {system} has two videos of prompt {key[0]} seed {key[2]}")
            path = (folder / video["path"]).resolve()
            if not path.is_relative_to(folder.resolve()) or not path.is_file():
                raise CampaignError(f"{folder / video['path']} is missing: eval.json names a video that is not there")
            files.setdefault(system, {})[key] = path
            for metric, value in video.items():
                if metric not in _VIDEO_FIELDS and isinstance(value, (int, float)):
                    video_scores.setdefault(metric, {})[(system, key)] = float(value)
        for system in seen:
            if any(video.get("system") == system for video in result["videos"]):
                settings[final_name(folder, system)] = result.get("generation") or {}
        for system, data in result.get("systems", {}).items():
            if system in seen:
                adapters[final_name(folder, system)] = _adapter_file(data.get("adapter"), folder)
                system_scores[final_name(folder, system)] = {
                    metric: float(value) for metric, value in (data.get("metrics") or {}).items()
                    if isinstance(value, (int, float))}

    chosen = sorted(files) if systems is None else list(systems)
    unknown = [s for s in chosen if s not in files]
    if unknown:
        raise CampaignError(f"--systems names {', '.join(unknown)}, not among the folders' systems "
                            f"({', '.join(sorted(files))})")
    if twice := sorted({s for s in chosen if chosen.count(s) > 1}):  # "a vs a" pairs broke its routes
        raise CampaignError(f"--systems names {', '.join(twice)} twice; name each system once")
    if len(set(chosen)) < 2:
        raise CampaignError(f"a campaign needs at least two systems; the folders have {', '.join(sorted(files))}")
    for system in chosen:
        # Systems are never in a URL (videos go by token), so eval's names stay as they are (`NAME@STEP`
        # too); only what a CSV cell and `--systems a,b` cannot hold is refused.
        if not isinstance(system, str) or not system.isprintable() or "," in system or not 0 < len(system) <= 128:
            raise CampaignError(f"system name {system!r} must be 1-128 printable characters without a comma")
    every_item = sorted(set().union(*(files[s] for s in chosen)))
    captions_of: dict[int, set[str]] = {}
    for prompt, caption, _ in every_item:
        captions_of.setdefault(prompt, set()).add(caption)
    other_prompts = sorted(prompt for prompt, captions in captions_of.items() if len(captions) > 1)
    if other_prompts:  # it read "lacks prompt 0 seed 0" of a system that has that video, of another prompt
        said = [repr(_shortened(caption)) for caption in sorted(captions_of[other_prompts[0]])]
        ways = f"{said[0]} in one and {said[1]} in another" if len(said) == 2 else \
            f"written {len(said)} ways: {', '.join(said)}"
        raise CampaignError(f"the folders' prompts differ (prompt {other_prompts[0]} is {ways}): evals of other "
                            "held-out clips cannot be rated side by side; evaluate every system on the same --heldout")
    missing = []
    for system in chosen:
        lacking = [f"prompt {prompt} seed {seed}" for prompt, caption, seed in every_item
                   if (prompt, caption, seed) not in files[system]]
        if lacking:
            missing.append(f"{system} lacks {', '.join(lacking)}")
    if missing:
        raise CampaignError("every system needs a video of the same prompts and seeds; missing " + "; ".join(missing))
    scored = {m for m in directions if m in video_scores or any(m in system_scores.get(s, {}) for s in chosen)}
    left_out = comparable_metrics({m: {s: d for s, d in definitions[m].items() if s in chosen}
                                   for m in sorted(scored) if m in definitions})
    for metric in sorted(scored - set(left_out)):  # measured for some systems only: it cannot rank them all
        unmeasured = [s for s in chosen if metric not in system_scores.get(s, {})
                      and not any(system == s for system, _ in video_scores.get(metric, {}))]
        if unmeasured:
            left_out[metric] = (f"{metric} is left out: the eval of {', '.join(unmeasured)} did not measure it, so it "
                                "cannot be compared across every system")
    kept = scored - set(left_out)
    items = [Item(prompt_index=p, prompt=caption, seed=seed) for p, caption, seed in every_item]
    index = {key: k for k, key in enumerate(every_item)}
    per_rater = pair_items(chosen, items)  # every pair on every item: the most one rater can give
    notes = [note] if (note := mixed_settings_note({s: settings.get(s, {}) for s in chosen})) else []
    if budget is not None and budget > per_rater:  # a budget of a million was taken without a word, never reachable
        notes.append(f"note: one rater can give at most {per_rater} ratings here (every pair of systems on every "
                     f"prompt/seed item once): a budget of {budget} needs {math.ceil(budget / per_rater)} raters or more")
    return CampaignSpec(
        name=name, systems=chosen, items=items, criteria=criteria,
        videos={(s, index[key]): files[s][key] for s in chosen for key in every_item},
        # Without a budget: every pair judged once on every item, the most one rater can be shown.
        budget=budget or per_rater, sources=[str(folder.resolve()) for folder in folders],
        metric_directions={m: d for m, d in directions.items() if m in kept},
        system_scores={s: {m: v for m, v in system_scores.get(s, {}).items() if m not in left_out} for s in chosen},
        video_scores={metric: {(s, index[key]): v for (s, key), v in values.items() if s in chosen}
                      for metric, values in video_scores.items() if metric not in left_out},
        metrics_left_out=left_out,
        adapters={s: adapters[s] for s in chosen if s in adapters},
        notes=notes,
    )


def _shortened(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def mixed_settings_note(settings: dict[str, dict]) -> str | None:
    """What `campaign create` says when the systems' videos were made with other generation settings (their
    evals' `generation`): raters then see clips of another length or size side by side, and per-video metrics
    (temporal flickering) compare them as they are. Allowed, since comparing settings may be the point
    (hot@10 against hot@5 steps); said, since it was silent. None when the settings agree."""
    keys = sorted(set().union(*settings.values())) if settings else []
    differing = [key for key in keys if len({json.dumps(values.get(key), sort_keys=True)
                                              for values in settings.values()}) > 1]
    if not differing:
        return None
    def said(values: dict, key: str) -> str:
        return "not recorded" if key not in values else "none" if values[key] is None else str(values[key])

    shown = "; ".join(f"{system}: " + ", ".join(f"{key} {said(values, key)}" for key in differing)
                      for system, values in settings.items())
    return (f"note: the systems' videos were made with other generation settings ({shown}); raters will see them "
            "side by side as they are, and metrics compare them so")


def create_campaign(data_dir: Path, name: str, sources: list[Path], systems: list[str] | None = None,
                    criteria: list[str] | None = None, budget: int | None = None, database: str | None = None):
    """Plan first (nothing is written when the folders do not make a campaign), then store (in `database`,
    a URL, or else DATA/campaigns.sqlite; its schema is migrated first, as the service does at start-up). Returns
    the campaign and the plan's notes for the person who made it."""
    from slapgen.campaign_store import CampaignStore

    spec = plan_campaign(name, sources, systems, criteria, budget)
    return CampaignStore(data_dir, database).create(spec), spec.notes


def _existing_store(settings):
    """The store create writes, or None where there is none yet (`existing_store_database`): listing or
    deleting then creates no file."""
    from slapgen.campaign_store import CAMPAIGNS_FILE, CampaignStore

    database = settings.existing_store_database(CAMPAIGNS_FILE)
    return CampaignStore(settings.data_dir, database) if database is not None else None


def _misspelt_criterion(criterion: str) -> str | None:
    """The studio's criterion `criterion` is a near miss of (`overal`, `motion_acuracy`), else None."""
    import difflib

    if criterion in CRITERIA:
        return None
    close = difflib.get_close_matches(criterion, CRITERIA, n=1, cutoff=0.85)
    return close[0] if close else None


def few_prompts_sentence(items: list, budget: int) -> str | None:
    """What `campaign create` says of a campaign that can never have its top system separated from the second (too
    few prompts, or too few prompt/seed items for the direct comparisons: `ranking.why_never_separated`): it then
    ends only on its budget. None otherwise."""
    from slapgen.campaign_store import prompt_count
    from slapgen.evaluation.ranking import why_never_separated

    never = why_never_separated(prompt_count(items), len(items))
    if never is None:
        return None
    return (f"note: {never}: the leaderboard can never call the top system separated from the second, so the "
            f"campaign ends only on its budget of {budget} ratings; eval on more held-out clips or --seeds for a "
            "campaign that can separate them")


def campaign_lines(settings) -> list[str]:
    """`slapgen campaign list`: a line per campaign (name, systems, ratings so far of its budget, raters) in the
    store `settings` name; none when there is none."""
    store = _existing_store(settings)
    overview = store.overview() if store is not None else []
    lines = []
    for entry in overview:
        systems = store.get(entry["name"]).systems
        raters = entry["raters"]
        lines.append(f"{entry['name']}: {len(systems)} systems ({', '.join(systems)}), {entry['ratings']}/"
                     f"{entry['budget']} ratings, {raters} rater{'s' * (raters != 1)}, criteria "
                     f"{', '.join(entry['criteria'])}")
    return lines


def delete_campaign(settings, name: str, confirmed: bool):
    """`slapgen campaign delete NAME`: the campaign, its pairs, verdicts and videos (`CampaignStore.delete`) in the
    store `settings` name; one with ratings only when `confirmed` (--yes)."""
    store = _existing_store(settings)
    try:
        if store is None:
            raise CampaignNotFoundError(f"no campaign named {name!r}", field="name")
        return store.delete(name, with_ratings=confirmed)
    except CampaignRatedError as error:
        raise CampaignRatedError(f"{error}; add --yes to delete it with them", error.ratings, error.raters) from None
    except CampaignNotFoundError as error:
        raise CampaignNotFoundError(f"{error} in {settings.where_campaigns_are()}; `slapgen campaign list` lists them", field="name") from None
