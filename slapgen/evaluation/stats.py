"""Paired-preference statistics: win rate with a 95% bootstrap interval over prompts, and a sign test.

They read `Comparison`s and nothing else, so the same code scores automatic metrics (a system's
number against the base model's on the same prompt and seed) and, later, human ratings from the
web studio. A comparison's `unit` is what the bootstrap resamples: the prompt, because several
seeds of one prompt are not independent evidence (they share whatever the prompt makes easy or hard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

WIN, TIE, LOSS = 1.0, 0.5, 0.0
DEFAULT_RESAMPLES = 10_000
# Unit indices drawn at once by `ratio_interval` (32 MiB): all 10,000 resamples of the studio's 20,000 rated prompts
# in one draw took 3.2 GB of a worker per summary (a review's find); in chunks, the same draws (numpy's stream does
# not depend on how it is cut) in bounded memory.
DRAW_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class Comparison:
    """One paired judgement of a system against its reference: WIN, TIE or LOSS, on `unit` (a prompt)."""

    unit: str
    outcome: float


@dataclass(frozen=True)
class WinRate:
    rate: float  # (wins + ties / 2) / comparisons
    low: float  # 95% bootstrap interval over units (percentile)
    high: float
    wins: int
    ties: int
    losses: int
    comparisons: int
    units: int
    sign_test_p: float  # two-sided, ties dropped

    def to_json(self) -> dict:
        return asdict(self)


def outcome(value: float, reference: float, higher_is_better: bool) -> float:
    """WIN when `value` beats `reference` in the metric's direction, TIE when equal, else LOSS."""
    if value == reference:
        return TIE
    return WIN if (value > reference) == higher_is_better else LOSS


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins against losses at p = 1/2 (ties left out); 1.0 with none. At p = 1/2
    the distribution is symmetric, so the two-sided p-value is twice the smaller tail, P(X <= min(wins, losses)):
    scipy.special's binomial CDF, in microseconds, where scipy.stats.binomtest took 0.25 ms and the studio's summary
    runs one per pair of systems and criterion (3,000 for a client posting ratings of many adapter scales)."""
    from scipy.special import bdtr

    if wins + losses == 0:
        return 1.0
    return float(min(1.0, 2.0 * bdtr(min(wins, losses), wins + losses, 0.5)))


def resample_units(units: int, resamples: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Bootstrap draws over units (prompts): row r lists the unit indices of resample r, drawn with
    replacement, as many as there are units. Every statistic here resamples through this one draw."""
    return as_generator(seed).integers(0, units, size=(resamples, units))


def as_generator(seed: int | np.random.Generator) -> np.random.Generator:
    """A seed's generator; a generator as it is (its stream goes on where it was)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def percentile_interval(values: np.ndarray, confidence: float = 0.95, axis: int = 0) -> tuple:
    """The percentile bootstrap interval: the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail], axis=axis)
    return low, high


def ratio_interval(numerators: np.ndarray, denominators: np.ndarray, resamples: int, seed: int | np.random.Generator,
                   confidence: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of sum(numerators) / sum(denominators), resampling units (one
    entry of each array per unit): a win rate's, a metric's agreement with raters'."""
    generator = as_generator(seed)  # one stream for every chunk
    rows = max(1, DRAW_CHUNK_ELEMENTS // max(1, len(numerators)))
    ratios = []
    for start in range(0, resamples, rows):
        draws = resample_units(len(numerators), min(rows, resamples - start), generator)
        ratios.append(numerators[draws].sum(axis=1) / denominators[draws].sum(axis=1))
    low, high = percentile_interval(np.concatenate(ratios), confidence)
    return float(low), float(high)


def win_rate(comparisons: Sequence[Comparison], resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
             confidence: float = 0.95) -> WinRate:
    """Win rate with ties counted half, its percentile bootstrap interval resampling whole units
    (all comparisons of a prompt go in or out together), and the sign test on untied comparisons."""
    if not comparisons:
        raise ValueError("no comparisons")
    bad = sorted({c.outcome for c in comparisons} - {WIN, TIE, LOSS})
    if bad:
        raise ValueError(f"outcomes must be {WIN}, {TIE} or {LOSS}, got {bad}")
    units = sorted({c.unit for c in comparisons})
    index = {unit: k for k, unit in enumerate(units)}
    score_sum = np.zeros(len(units))
    count = np.zeros(len(units))
    for comparison in comparisons:
        score_sum[index[comparison.unit]] += comparison.outcome
        count[index[comparison.unit]] += 1
    low, high = ratio_interval(score_sum, count, resamples, seed, confidence)
    wins = sum(c.outcome == WIN for c in comparisons)
    losses = sum(c.outcome == LOSS for c in comparisons)
    return WinRate(
        rate=float(score_sum.sum() / count.sum()), low=float(low), high=float(high), wins=wins,
        ties=len(comparisons) - wins - losses, losses=losses, comparisons=len(comparisons), units=len(units),
        sign_test_p=sign_test(wins, losses),
    )
