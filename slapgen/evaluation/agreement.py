"""How far pairwise verdicts agree: between raters (Krippendorff's alpha), with themselves on repeated
pairs, and with an automatic metric (share of verdicts it agrees with, Kendall's tau of rankings).

It reads `ranking.Verdict`s. A verdict's value is the system it prefers, or a tie, whichever side
each video was shown on; a unit is the unordered pair of systems on one prompt and seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from slapgen.evaluation.ranking import TIE, Verdict
from slapgen.evaluation.stats import DEFAULT_RESAMPLES, ratio_interval


def _unit(verdict: Verdict) -> tuple:
    return (*sorted((verdict.left, verdict.right)), verdict.prompt, verdict.seed)


def krippendorff_alpha(verdicts: Sequence[Verdict]) -> float | None:
    """Krippendorff's alpha for nominal data (Krippendorff, Content Analysis, 2004, ch. 11): values are
    the preferred system or a tie, units (pair, prompt, seed), coders the raters; a rater's first
    verdict on a unit counts (their repeats are `rater_consistency`'s). With o_ck the coincidence
    matrix (each ordered pair of values from two raters in a unit of m values adds 1 / (m - 1)),
    n_c its margins and n their total, alpha = 1 - (n - 1) sum_{c != k} o_ck / sum_{c != k} n_c n_k.
    None when fewer than two raters share a unit, or every value is the same (alpha undefined)."""
    first: dict[tuple, dict[str, str]] = {}
    for v in verdicts:
        first.setdefault(_unit(v), {}).setdefault(v.rater, v.winner)
    units = [list(by_rater.values()) for by_rater in first.values() if len(by_rater) >= 2]
    categories = sorted({value for values in units for value in values})
    if len(categories) < 2:
        return None
    index = {c: k for k, c in enumerate(categories)}
    coincidence = np.zeros((len(categories), len(categories)))
    for values in units:
        counts = np.bincount([index[v] for v in values], minlength=len(categories)).astype(float)
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (len(values) - 1)
    margins = coincidence.sum(axis=1)
    total = margins.sum()
    disagreeing = coincidence.sum() - np.trace(coincidence)
    expected = total**2 - (margins**2).sum()
    return float(1.0 - (total - 1.0) * disagreeing / expected)


@dataclass(frozen=True)
class Consistency:
    rater: str
    repeats: int  # verdicts on a unit the rater had already judged
    consistent: int  # of those, how many say what the rater's first verdict on that unit said
    rate: float | None  # consistent / repeats; None without repeats

    def to_json(self) -> dict:
        return asdict(self)


def rater_consistency(verdicts: Sequence[Verdict]) -> dict[str, Consistency]:
    """Each rater's self-agreement: every later verdict on a unit (pair, prompt, seed) they had already
    judged is compared with their first one there, in the order `verdicts` are given."""
    first: dict[tuple, str] = {}
    repeats: dict[str, list[bool]] = {}
    for v in verdicts:
        key = (v.rater, *_unit(v))
        repeats.setdefault(v.rater, [])
        if key in first:
            repeats[v.rater].append(first[key] == v.winner)
        else:
            first[key] = v.winner
    return {rater: Consistency(rater, len(same), sum(same), sum(same) / len(same) if same else None)
            for rater, same in sorted(repeats.items())}


@dataclass(frozen=True)
class MetricAgreement:
    rate: float | None  # share of compared verdicts whose preferred system the metric also prefers
    low: float | None  # 95% percentile bootstrap interval over prompts
    high: float | None
    agreeing: int
    compared: int  # verdicts with a preference, both videos scored, and the scores unequal
    human_ties: int  # left out
    metric_ties: int  # left out
    unscored: int  # left out: a video (or system) without a score
    prompts: int

    def to_json(self) -> dict:
        return asdict(self)


def metric_agreement(verdicts: Sequence[Verdict], scores: Mapping, higher_is_better: bool = True,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = 0.95) -> MetricAgreement:
    """How often an automatic metric prefers the system the rater preferred, on the same pairs. `scores`
    is per video, keyed (system, prompt, seed), or per system, keyed by its name. Human ties and
    equal scores are left out (counted apart). The interval resamples prompts as `stats.win_rate`."""
    per_video = any(isinstance(key, tuple) for key in scores)

    def score(system: str, v: Verdict):
        return scores.get((system, v.prompt, v.seed)) if per_video else scores.get(system)

    human_ties = metric_ties = unscored = 0
    by_prompt: dict[str, list[bool]] = {}
    for v in verdicts:
        if v.outcome == TIE:
            human_ties += 1
            continue
        left, right = score(v.left, v), score(v.right, v)
        if left is None or right is None:
            unscored += 1
            continue
        if left == right:
            metric_ties += 1
            continue
        metric_winner = v.left if (left > right) == higher_is_better else v.right
        by_prompt.setdefault(v.prompt, []).append(metric_winner == v.winner)
    prompts = sorted(by_prompt)
    agreeing = np.array([sum(by_prompt[p]) for p in prompts], dtype=float)
    compared = np.array([len(by_prompt[p]) for p in prompts], dtype=float)
    if not prompts:
        return MetricAgreement(None, None, None, 0, 0, human_ties, metric_ties, unscored, 0)
    low, high = ratio_interval(agreeing, compared, resamples, seed, confidence)
    return MetricAgreement(
        rate=float(agreeing.sum() / compared.sum()), low=float(low), high=float(high), agreeing=int(agreeing.sum()),
        compared=int(compared.sum()), human_ties=human_ties, metric_ties=metric_ties, unscored=unscored,
        prompts=len(prompts),
    )


def ranking_tau(metric_by_system: Mapping[str, float], strengths: Mapping[str, float],
                higher_is_better: bool = True) -> tuple[float, float]:
    """Kendall's tau-b (scipy) between the systems' order by the metric (its better end first) and by
    Bradley-Terry strength, over the systems both name, with its two-sided p-value."""
    from scipy.stats import kendalltau

    systems = sorted(set(metric_by_system) & set(strengths))
    if len(systems) < 2:
        raise ValueError("Kendall's tau needs at least two systems scored by both the metric and the ranking")
    sign = 1.0 if higher_is_better else -1.0
    result = kendalltau([sign * metric_by_system[s] for s in systems], [strengths[s] for s in systems])
    return float(result.statistic), float(result.pvalue)
