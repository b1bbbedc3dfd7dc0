"""A rating campaign's leaderboard, per criterion: Bradley-Terry strengths with 95% intervals and ranks
(`ranking.rank_systems`), whether the campaign may stop and why (`ranking.stopping`), agreement
between raters and of each rater with themselves (`agreement`), and per automatic metric of the eval
runs the videos came from: how often it prefers the video the raters preferred, and Kendall's tau
between its ranking of the systems and theirs, with a sentence naming the metric that tracks them. Once
done, the winner with its LoRA file (what serving it takes).

It reads `ranking.Verdict`s and plain scores; no storage and no HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from slapgen.evaluation.agreement import krippendorff_alpha, metric_agreement, ranking_tau, rater_consistency
from slapgen.evaluation.ranking import (MIN_SEPARATION_PROMPTS, SEPARATION_EVIDENCE, Ranking, Stop, Verdict,
                                        enough_prompts_to_separate, rank_systems, stopping, why_never_separated)


def criterion_board(verdicts: Sequence[Verdict], repeats: Sequence[Verdict], systems: Sequence[str],
                    budget: int | None, metric_directions: Mapping[str, bool],
                    system_scores: Mapping[str, Mapping[str, float]],
                    video_scores: Mapping[str, Mapping[tuple[str, str, int], float]],
                    resamples: int = 1000, metrics_left_out: Mapping[str, str] | None = None,
                    adapters: Mapping[str, str | None] | None = None, campaign_prompts: int | None = None,
                    campaign_items: int | None = None) -> dict:
    """One criterion's leaderboard. `verdicts` rank the systems; `repeats` (pairs shown again to the
    same rater) only measure consistency. `system_scores`: system -> metric -> value; `video_scores`:
    metric -> (system, prompt, seed) -> value; `metrics_left_out`: metric -> the sentence why it is not
    compared (its definition differs between the systems), said after the metric summary; `adapters`: system ->
    its LoRA file (None: the base model; a system missing: not recorded), named for the winner; `campaign_prompts`,
    `campaign_items`: the prompts and the prompt/seed items the campaign has (None: not known), so that one that can
    never separate its top system (`ranking.why_never_separated`) says it ends on its budget."""
    metrics_left_out = dict(metrics_left_out or {})
    ranking = rank_systems(verdicts, systems, resamples=resamples)
    stop = stopping(ranking, budget)
    strengths = {s.system: s.strength for s in ranking.standings}
    metrics = {}
    for metric, higher in sorted(metric_directions.items()):
        per_video = video_scores.get(metric)
        per_system = {system: scores[metric] for system, scores in system_scores.items() if metric in scores}
        agreement = metric_agreement(verdicts, per_video if per_video else per_system, higher_is_better=higher,
                                     resamples=resamples)
        tau = p_value = None
        if len(set(per_system) & set(systems)) >= 2 and verdicts:
            tau, p_value = (_finite(x) for x in ranking_tau(per_system, strengths, higher_is_better=higher))
        metrics[metric] = {"higher_is_better": higher, "scored": "per video" if per_video else "per system",
                           "agreement": agreement.to_json(), "kendall_tau": tau, "kendall_p_value": p_value}
    return {
        **ranking.to_json(),
        "budget": budget,
        "done": stop.done,
        "reason": stop.reason,
        "why": _why(stop, ranking, budget, campaign_prompts, campaign_items),
        "winner": (winner(ranking.standings[0].system, adapters or {},
                          runner_up=None if stop.reason == "separated" else ranking.standings[1].system,
                          level_with=[standing.system for standing in ranking.standings[1:] if standing.rank == 1])
                   if stop.done and ranking.standings else None),
        "inter_rater_alpha": krippendorff_alpha(verdicts),
        # raters who answered a repeat only: one row per rater held 372 KB of nulls at 2,179 raters (a soak's)
        "rater_consistency": {rater: c.to_json() for rater, c in rater_consistency([*verdicts, *repeats]).items()
                              if c.repeats},
        "metrics": metrics,
        "metrics_left_out": metrics_left_out,
        "metric_summary": " ".join([*([metric_sentence(metrics)] if metrics or not metrics_left_out else []),
                                    *left_out_sentences(metrics_left_out)]),
        "pick_by": tracking_metric(metrics),
    }


def winner(system: str, adapters: Mapping[str, str | None], runner_up: str | None = None,
           level_with: Sequence[str] = ()) -> dict:
    """The top system of a done criterion with its LoRA file (`adapter`, None for the base model or when the
    campaign did not record it) and a sentence saying how to serve it. `runner_up`: the second system when the
    criterion is done without the top one separated from it (the budget ran out first): the sentence says it
    leads, not that it won (a walk-through's campaign of 8 ratings on 4 prompts read "smoke won" right under
    "too few to separate the top system from the second"), and `separated` is false; `level_with`: the others of
    the top system's strength (ranked 1 with it): the sentence names them all as level (it said one led, the first
    of them by name) and advises serving none."""
    if level_with and runner_up is not None:
        *others, last = [system, *level_with]
        return {"system": system, "adapter": adapters.get(system), "separated": False, "sentence": (
            f"{', '.join(others)} and {last} are level: these ratings give them equal strength (the budget ran out "
            "first); a campaign with a larger --budget can tell them apart")}
    leads = (f"{system} won" if runner_up is None else
             f"{system} leads, but these ratings do not separate it from {runner_up} (the budget ran out first)")
    if system not in adapters:
        sentence = (f"{leads}; this campaign was made before campaigns recorded LoRA files: the `adapter` of "
                    "its system in the eval.json it came from names its file")
    elif adapters[system] is None:
        sentence = f"{leads}: the base model, served without an adapter"
    else:
        sentence = (f"{leads}; its LoRA file is {adapters[system]} (serve it: POST /adapters/upload, or copy it to "
                    "SLAP_ADAPTERS_DIR/NAME.safetensors)")
    return {"system": system, "adapter": adapters.get(system), "separated": runner_up is None, "sentence": sentence}


def _finite(value: float) -> float | None:
    """Kendall's tau is undefined (NaN) when either order is all ties, e.g. a metric equal for every
    system or a ranking with no verdict yet: None then, which JSON can carry. To 12 significant digits: a tau of
    1 read 0.9999999999999999."""
    return float(f"{value:.12g}") if math.isfinite(value) else None


def _separation(ranking: Ranking) -> str:
    """Where the two tests of separation stand (`ranking.stopping`): the bootstrap's share and the direct
    comparisons' evidence, each with what it needs."""
    duel = ranking.head_to_head
    items = f"{duel.wins + duel.losses} item{'s' * (duel.wins + duel.losses != 1)}"
    if duel.losses > duel.wins:  # its evidence says they differ, the other way (a review's case read "not yet" only)
        direct = (f"but {duel.second} is ahead of it in their direct comparisons ({duel.losses} of {items}, each "
                  "item's first verdict that is not a tie)")
    else:
        direct = (f"and wins {duel.wins} of {items} against {duel.second} (each item's first verdict that is not a "
                  f"tie; evidence {duel.evidence:.1f}, {SEPARATION_EVIDENCE:.0f} needed)")
    return (f"{ranking.standings[0].system} beats the second in {ranking.top_beats_second:.0%} of bootstrap resamples "
            f"(95% needed) {direct}")


def _why(stop: Stop, ranking: Ranking, budget: int | None, campaign_prompts: int | None = None,
         campaign_items: int | None = None) -> str:
    ratings, prompts = ranking.ratings, ranking.prompts
    if stop.reason == "separated":
        return f"separated: {_separation(ranking)}"
    few = stop.prompts_needed > 0
    if stop.reason == "budget":
        if few:
            return (f"the budget of {budget} ratings is reached, on {prompts} prompt{'s' * (prompts != 1)}: too few to "
                    f"separate the top system from the second (at least {MIN_SEPARATION_PROMPTS})")
        return f"the budget of {budget} ratings is reached before separation: {_separation(ranking)}"
    left = f"; {budget - ratings} ratings left in the budget" if budget is not None else ""
    never = why_never_separated(campaign_prompts, campaign_items) if campaign_prompts is not None else None
    if never is not None:
        # "needs at least 5" read as "rate more", on a campaign that has no fifth prompt (a walk-through's find).
        ends = "only the budget can end it" if budget is not None else "without a budget it cannot end"
        return f"not yet, and {ends}: the campaign has {never}{left}"
    if few:
        return (f"not yet: verdicts on {prompts} prompt{'s' * (prompts != 1)}, and separating the top system from "
                f"the second needs at least {MIN_SEPARATION_PROMPTS}{left}")
    return f"not yet: {_separation(ranking)}{left}"


def _most_agreeing(metrics: Mapping[str, dict]) -> tuple[str, dict] | None:
    """The metric with the highest agreement rate (then the highest tau), or None when none was compared."""
    rated = {name: m for name, m in metrics.items() if m["agreement"]["rate"] is not None}
    if not rated:
        return None
    return max(rated.items(), key=lambda kv: (kv[1]["agreement"]["rate"], kv[1]["kendall_tau"] or -2))


def left_out_sentences(metrics_left_out: Mapping[str, str]) -> list[str]:
    """Why each metric left out of a campaign is (`trainer.campaign.comparable_metrics`), as sentences, in
    metric order: what `campaign create` prints and the leaderboard's summary ends with."""
    return [f"{why[0].upper()}{why[1:]}." for _, why in sorted(metrics_left_out.items())]


def _on_enough_prompts(agreement: Mapping) -> bool:
    """Whether an agreement rests on enough prompts to call a metric for or against the raters: the stopping rule's
    MIN_SEPARATION_PROMPTS, for the same reason (a bootstrap over 2 prompts has a handful of distinct resamples: a
    walk-through's campaign read "clearly against the raters ... 95% interval 67% to 67%")."""
    return enough_prompts_to_separate(agreement["prompts"])


def tracking_metric(metrics: Mapping[str, dict]) -> str | None:
    """The metric to pick checkpoints by next time (`--pick-by`, under eval's name for it): the one that
    agrees with the raters most, when its 95% interval lies above chance on enough prompts; None otherwise."""
    found = _most_agreeing(metrics)
    if found is None or not _on_enough_prompts(found[1]["agreement"]):
        return None
    return found[0] if found[1]["agreement"]["low"] > 0.5 else None


def metric_sentence(metrics: Mapping[str, dict]) -> str:
    """Which automatic metric tracks the raters: the highest agreement rate, its interval and tau said,
    and the `--pick-by` that uses it when it is clearly better than chance."""
    found = _most_agreeing(metrics)
    if found is None:
        if not metrics:
            return "The eval runs behind this campaign scored no automatic metric, so none can be compared."
        return "No automatic metric can be compared with the raters yet: no verdict with a preference on scored videos."
    best_name, best = found
    a = best["agreement"]
    if not _on_enough_prompts(a):
        return (f"Too few prompts to tell which automatic metric tracks the raters: verdicts on {a['prompts']} "
                f"prompt{'s' * (a['prompts'] != 1)}, and calling a metric for or against them needs at least "
                f"{MIN_SEPARATION_PROMPTS}; so far {best_name} agrees with them most ({a['rate']:.0%} of "
                f"{a['compared']} verdicts).")
    if a["high"] < 0.5:  # even the most agreeing metric points the other way: the contrary sentence says it all
        return f"No automatic metric agrees with the raters.{_contrary_sentence(metrics)}"
    tau = f", and its ranking of the systems has Kendall's tau {best['kendall_tau']:.2f} with theirs" \
        if best["kendall_tau"] is not None else ""
    tracking = tracking_metric(metrics) == best_name
    verdict = "tracks the raters best" if tracking else "agrees with the raters most, but not clearly better than chance"
    advice = (f" Pick the next sweep's or eval's best checkpoint by it: --pick-by {best_name}." if tracking else "")
    return (f"{best_name} {verdict}: it prefers the video the raters preferred in {a['rate']:.0%} of "
            f"{a['compared']} verdicts (95% interval {a['low']:.0%} to {a['high']:.0%}){tau}."
            f"{_contrary_sentence(metrics)}{advice}")


def _contrary_sentence(metrics: Mapping[str, dict]) -> str:
    """Metrics that clearly point the other way (95% interval of agreement below chance), said, as they are
    telling too: on a tiny walk-through raters who liked motion disagreed with temporal_flickering (1.0 for a
    still video) in every verdict, and the summary, naming only the most agreeing metric, hid it."""
    contrary = sorted(((name, m["agreement"]) for name, m in metrics.items() if m["agreement"]["rate"] is not None
                       and m["agreement"]["high"] < 0.5 and _on_enough_prompts(m["agreement"])),
                      key=lambda kv: kv[1]["rate"])
    if not contrary:
        return ""
    said = "; ".join(f"{name} prefers the video they did not in {1 - a['rate']:.0%} of {a['compared']} verdicts "
                     f"(95% interval {1 - a['high']:.0%} to {1 - a['low']:.0%})" for name, a in contrary)
    penalise, it = ("it penalises", "it") if len(contrary) == 1 else ("these metrics penalise", "them")
    return f" Clearly against the raters: {said}; the raters prefer what {penalise}, so do not pick by {it}."
