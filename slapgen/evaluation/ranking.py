"""Ranking many systems from blind pairwise verdicts: Bradley-Terry strengths with ties, bootstrap
intervals over prompts, a stopping rule, and the next pair worth asking a rater about.

The statistical core of a rating campaign (issue 20); no HTTP and no storage: it reads `Verdict`s.

Model: Davidson's (1970) Bradley-Terry with ties. With log-strengths theta and a tie parameter nu,
    P(i beats j) = e^theta_i / D,  P(tie) = nu * e^((theta_i + theta_j) / 2) / D,
    D = e^theta_i + e^theta_j + nu * e^((theta_i + theta_j) / 2).
Why Davidson rather than Rao-Kupper: it keeps Bradley-Terry's odds (P(i beats j) / P(j beats i) =
e^(theta_i - theta_j), ties or not), a tie is likeliest between equals, and its score equations are
"wins + ties / 2 = expected" for every system, so it ranks as the ties-half win counts of
`stats.win_rate` do; Rao-Kupper's threshold changes the win odds with the tie rate. With no tie in
the data, nu's estimate is 0 and the model is plain Bradley-Terry, which is what is fitted then.

Identifiability and finiteness: the likelihood depends on differences only, so the mean
log-strength is fixed at 0 (a (sum theta)^2 / 2 term, zero at the optimum, pins it). A ridge
`ridge / 2 * sum theta^2`, i.e. a N(0, 1 / ridge) prior on each log-strength (ridge 0.1: standard
deviation 3.2, odds of 24:1 per standard deviation, weak next to the 0.25 information of one
comparison times the dozens a system gets), keeps a system with all wins, or with no comparison,
finite (the latter at 0); log nu gets the same prior around 0 (nu = 1).

The fit is Newton's method on the penalised log-likelihood, vectorised over bootstrap resamples
(every resample is a refit on prompt groups drawn with replacement, `stats.resample_units`). A strength's
95% interval is the wider of that bootstrap's and the fit's own (Laplace: the penalised Hessian's inverse):
over few verdicts the bootstrap has few distinct resamples and was far too narrow ([1.06, 1.06] after one
rating), while the Hessian knows how little a handful of verdicts says but not that verdicts on one prompt
go together.

The stopping rule is looked at after every rating, so its test must hold however often it is looked at: the
bootstrap's 95% share alone, checked after each rating, called a winner between equal systems in 62 of 100
simulated campaigns (3 systems, 6 prompts, coin-flip raters; a walk-through's find). Separation also needs the
top system's direct comparisons with the second to pass an anytime-valid test (`head_to_head_evidence`), one
vote per item (prompt and seed: the first verdict on its two videos that is not a tie), since raters judging the
same two videos do not judge independently of each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import sparse
# scipy.special's ndtr is the standard normal CDF (scipy.stats.norm.cdf) without importing scipy.stats, which
# costs every service start (each worker imports this through the campaign routes) about 0.5 s.
from scipy.special import betaln, logsumexp, ndtr, ndtri, owens_t

from slapgen.evaluation.stats import percentile_interval, resample_units

LEFT, RIGHT, TIE = "left", "right", "tie"
OUTCOMES = (LEFT, RIGHT, TIE)
RIDGE = 0.1
# Each resample is a refit (a small Newton solve), so fewer than stats.DEFAULT_RESAMPLES' 10,000.
DEFAULT_RESAMPLES = 1000
SEPARATION = 0.95  # the stopping rule's confidence that the top system beats the second
# A bootstrap over a handful of prompts has a handful of distinct resamples (over one prompt, every
# resample is the same, so one verdict looked 100% separated): separation needs at least this many.
MIN_SEPARATION_PROMPTS = 5
STRENGTH_TIE = 1e-9  # strengths this close are equal: after one tie, the leader was ahead by rounding
# The head-to-head e-value separation needs (`head_to_head_evidence`): 1 / alpha, alpha the chance that two equal
# systems ever reach it, in either direction, however often the rule is checked (per pair of systems that lead).
SEPARATION_EVIDENCE = 20.0  # 1 / alpha, alpha = 1 - SEPARATION = 0.05
EXPLORATION = 0.1  # share of pairs chosen uniformly at random by `next_pair`


def head_to_head_evidence(wins: int, losses: int) -> float:
    """How strongly `wins` and `losses` of one system's direct comparisons with another (ties left out) say the two
    differ: an e-value, their likelihood averaged over a preference p uniform on [0, 1] over their likelihood at
    p = 1/2 (a mixture sign test),
        E = 2^n * B(wins + 1, losses + 1) = 2^n * wins! losses! / (n + 1)!,  n = wins + losses.
    Whatever the count, its expectation is 1 when the two are equal, so by Ville's inequality the chance it ever
    reaches 1 / alpha, checked after every comparison, is at most alpha, in whichever direction (a one-sided
    mixture, checked in the direction of whichever system led, reached 20 in 7.4% of equal pairs: a review's
    simulation). 8 wins and no loss give 28.4; 7 and none 16."""
    n = wins + losses
    return float(np.exp(n * np.log(2) + betaln(wins + 1, losses + 1)))


def separation_items_needed() -> int:
    """The fewest comparisons that can reach SEPARATION_EVIDENCE: that many straight wins (8)."""
    return next(n for n in range(1, 100) if head_to_head_evidence(n, 0) >= SEPARATION_EVIDENCE)


def why_never_separated(prompts: int, items: int | None) -> str | None:
    """Why a campaign of `prompts` prompts and `items` items (prompt and seed; None: not known) can never have its
    top system separated from the second, whatever its raters say, or None when it can: its budget alone ends it
    then."""
    if not enough_prompts_to_separate(prompts):
        return (f"{prompts} prompt{'s' * (prompts != 1)}, and separation needs verdicts on at least "
                f"{MIN_SEPARATION_PROMPTS}")
    if items is not None and items < (needed := separation_items_needed()):
        return (f"{items} prompt/seed items, and separation needs the top system to beat the second on at least "
                f"{needed} of them")
    return None


def enough_prompts_to_separate(prompts: int) -> bool:
    """Whether verdicts on `prompts` prompts may separate two systems (and call a metric for or against raters)."""
    return prompts >= MIN_SEPARATION_PROMPTS


# Outcome -> its (s, t, log nu) coefficients in the log-probability's numerator: a's win, b's win, tie.
_OUTCOME_COEFFICIENTS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 1.0]])


@dataclass(frozen=True)
class Verdict:
    """One rater's blind judgement of the videos of two systems made from one prompt and seed."""

    left: str  # system shown on the left
    right: str
    outcome: str  # LEFT, RIGHT or TIE
    prompt: str  # the bootstrap unit
    seed: int = 0
    rater: str = ""

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"a verdict's outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
        if self.left == self.right:
            raise ValueError(f"a verdict compares two different systems, got {self.left!r} twice")

    @property
    def winner(self) -> str:
        """The preferred system's name, or TIE: what a verdict says whichever side each video was shown on."""
        return {LEFT: self.left, RIGHT: self.right, TIE: TIE}[self.outcome]


@dataclass(frozen=True)
class Pair:
    """The next comparison to show: `left` and `right` systems on one prompt and seed."""

    left: str
    right: str
    prompt: str
    seed: int


@dataclass(frozen=True)
class Standing:
    system: str
    strength: float  # log-strength, mean 0 over the systems
    low: float  # 95% interval: the wider of the bootstrap over prompts (percentile) and the Laplace interval
    high: float
    rank: int  # 1 = strongest, by the point estimate; systems of equal strength (STRENGTH_TIE) share one: 1, 1, 3
    comparisons: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HeadToHead:
    """The top system's direct comparisons with the second, one per item (prompt and seed: the first verdict on its
    two videos that is not a tie), and what they say (`head_to_head_evidence`)."""

    top: str
    second: str
    wins: int  # items whose first decisive verdict prefers the top system
    losses: int  # prefers the second
    ties: int  # items judged only as ties
    evidence: float

    def to_json(self) -> dict:
        return {**asdict(self), "evidence_needed": SEPARATION_EVIDENCE}


@dataclass(frozen=True)
class Ranking:
    standings: list[Standing]  # strongest first
    tie_parameter: float  # Davidson's nu (0 when no verdict was a tie)
    top_beats_second: float  # share of resamples in which the top system's strength exceeds the second's
    ratings: int
    prompts: int
    head_to_head: HeadToHead

    def to_json(self) -> dict:
        return {"standings": [s.to_json() for s in self.standings], "tie_parameter": self.tie_parameter,
                "top_beats_second": self.top_beats_second, "head_to_head": self.head_to_head.to_json(),
                "ratings": self.ratings, "prompts": self.prompts}


@dataclass(frozen=True)
class Stop:
    done: bool
    reason: str | None  # "separated", "budget" or None while neither holds
    prompts_needed: int = 0  # more prompts with verdicts before separation can hold (MIN_SEPARATION_PROMPTS)
    bootstrap_separates: bool = False  # the top system beats the second in `separation` of the resamples
    head_to_head_separates: bool = False  # their direct comparisons favour the top with SEPARATION_EVIDENCE

    def to_json(self) -> dict:
        return asdict(self)


class _Tally:
    """Verdicts as counts: for each prompt and each compared pair (a, b) with a < b in `systems`'
    order, how often a won, b won, and they tied. What the likelihood needs, nothing else."""

    def __init__(self, verdicts: Sequence[Verdict], systems: Sequence[str]):
        self.systems = list(systems)
        index = {name: k for k, name in enumerate(self.systems)}
        unknown = sorted({name for v in verdicts for name in (v.left, v.right)} - set(index))
        if unknown:
            raise ValueError(f"verdicts name systems outside the ranking: {', '.join(unknown)}")
        self.prompts = sorted({v.prompt for v in verdicts})
        prompt_index = {p: k for k, p in enumerate(self.prompts)}
        pair_index: dict[tuple[int, int], int] = {}
        entries = []
        for v in verdicts:
            a, b = index[v.left], index[v.right]
            column = {LEFT: 0, RIGHT: 1, TIE: 2}[v.outcome]
            if a > b:
                a, b = b, a
                column = {0: 1, 1: 0, 2: 2}[column]
            row = pair_index.setdefault((a, b), len(pair_index))
            entries.append((prompt_index[v.prompt], row, column))
        self.pairs = np.array(list(pair_index), dtype=int).reshape(-1, 2)
        self.counts = np.zeros((len(self.prompts), len(self.pairs), 3))
        for entry in entries:
            self.counts[entry] += 1
        self.has_ties = bool(self.counts[..., 2].sum() > 0)

    def comparisons(self) -> np.ndarray:
        per_pair = self.counts.sum(axis=(0, 2))
        out = np.zeros(len(self.systems), dtype=int)
        np.add.at(out, self.pairs[:, 0], per_pair.astype(int))
        np.add.at(out, self.pairs[:, 1], per_pair.astype(int))
        return out


def _logsumexp_last(values: np.ndarray) -> np.ndarray:
    """log(sum(exp)) over the last axis, shifted by its maximum (finite: a win logit always is)."""
    top = values.max(axis=-1)
    return top + np.log(np.exp(values - top[..., None]).sum(axis=-1))


def _penalised_newton(pairs: np.ndarray, counts: np.ndarray, systems: int, with_ties: bool, ridge: float,
                      iterations: int = 100, tolerance: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Maximise the penalised Davidson log-likelihood for each of `counts`' B tallies (B, pairs, 3).
    Returns the parameters (B, systems + 1: log-strengths then log nu) and the penalised negative
    Hessian at them (B, systems + 1, systems + 1)."""
    batch, rows, size = counts.shape[0], len(pairs), systems + 1
    # Which parameter each row's (s, t, log nu) is: scatter matrices for the gradient and the Hessian.
    slots = np.stack([pairs[:, 0], pairs[:, 1], np.full(rows, systems)], axis=1)  # (rows, 3)
    gradient_gather = sparse.csr_matrix((np.ones(rows * 3), (slots.ravel(), np.arange(rows * 3))),
                                        shape=(size, rows * 3))
    flat = (slots[:, :, None] * size + slots[:, None, :]).ravel()  # (rows * 9,)
    hessian_gather = sparse.csr_matrix((np.ones(rows * 9), (flat, np.arange(rows * 9))), shape=(size * size, rows * 9))
    totals = counts.sum(axis=-1)  # (B, rows)
    observed = counts @ _OUTCOME_COEFFICIENTS  # (B, rows, 3)
    prior = np.full(size, ridge)
    if not with_ties:
        prior[-1] = 1.0  # log nu is unused: held at 0 by this term alone
    is_theta = np.ones(size)
    is_theta[-1] = 0.0

    def objective_parts(x, need_derivatives):
        s, t, log_nu = x[:, pairs[:, 0]], x[:, pairs[:, 1]], x[:, -1:]
        tie_logit = log_nu + (s + t) / 2 if with_ties else np.full_like(s, -np.inf)
        logits = np.stack([s, t, tie_logit], axis=-1)  # (B, rows, 3)
        log_d = _logsumexp_last(logits)
        safe = np.where(counts > 0, logits, 0.0)
        centre = (x * is_theta).sum(axis=1)
        value = -((counts * safe).sum(axis=(1, 2)) - (totals * log_d).sum(axis=1))
        value += 0.5 * (prior * x * x).sum(axis=1) + 0.5 * centre**2
        if not need_derivatives:
            return value, None, None
        p = np.exp(logits - log_d[..., None])
        expected = p @ _OUTCOME_COEFFICIENTS  # (B, rows, 3): E[coefficients]
        row_gradient = totals[..., None] * expected - observed
        gradient = (gradient_gather @ row_gradient.reshape(batch, -1).T).T
        gradient += prior * x + centre[:, None] * is_theta
        # Hessian of log D in (s, t, log nu): Cov_p of the outcome coefficients.
        second = np.einsum("bro,oi,oj->brij", p, _OUTCOME_COEFFICIENTS, _OUTCOME_COEFFICIENTS)
        row_hessian = totals[..., None, None] * (second - expected[..., :, None] * expected[..., None, :])
        hessian = (hessian_gather @ row_hessian.reshape(batch, -1).T).T.reshape(batch, size, size)
        hessian += np.diag(prior) + np.outer(is_theta, is_theta)
        return value, gradient, hessian

    x = np.zeros((batch, size))
    for _ in range(iterations):
        value, gradient, hessian = objective_parts(x, True)
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        if np.abs(step).max() < tolerance:
            break
        # Backtracking: the objective is convex, so halving the Newton step until it decreases is enough.
        scale = np.ones(batch)
        for _ in range(40):
            trial = x - scale[:, None] * step
            trial_value, _, _ = objective_parts(trial, False)
            worse = trial_value > value + 1e-12 * np.abs(value)
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
        x = trial
    _, _, hessian = objective_parts(x, True)
    return x, hessian


def fit_strengths(verdicts: Sequence[Verdict], systems: Sequence[str], ridge: float = RIDGE) -> dict[str, float]:
    """Davidson-Bradley-Terry log-strengths (mean 0) of `systems` from `verdicts`, by penalised maximum
    likelihood (module docstring). `ridge=0` is plain maximum likelihood: finite only when every
    system has both won and lost against a connected design."""
    tally = _Tally(verdicts, systems)
    x, _ = _fit(tally, tally.counts.sum(axis=0, keepdims=True), ridge)
    return dict(zip(tally.systems, x[0, :-1].tolist()))


def _fit(tally: _Tally, counts: np.ndarray, ridge: float, chunk: int = 250) -> tuple[np.ndarray, np.ndarray]:
    systems = len(tally.systems)
    if len(tally.pairs) == 0:
        return np.zeros((len(counts), systems + 1)), np.broadcast_to(
            np.diag([ridge] * systems + [ridge]) + np.outer([1.0] * systems + [0.0], [1.0] * systems + [0.0]),
            (len(counts), systems + 1, systems + 1))
    parts = [_penalised_newton(tally.pairs, counts[i:i + chunk], systems, tally.has_ties, ridge)
             for i in range(0, len(counts), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def rank_systems(verdicts: Sequence[Verdict], systems: Sequence[str], resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0, confidence: float = 0.95, ridge: float = RIDGE) -> Ranking:
    """Strengths with percentile bootstrap intervals over prompts (all verdicts on a prompt go in or
    out together, as `stats.win_rate`), ranks by the point estimate, and the share of resamples in
    which the top system is stronger than the second (the stopping rule's number)."""
    if len(systems) < 2:
        raise ValueError("a ranking needs at least two systems")
    tally = _Tally(verdicts, systems)
    point, hessian = _fit(tally, tally.counts.sum(axis=0, keepdims=True), ridge)
    strengths = point[0, :-1]
    if tally.prompts:
        draws = resample_units(len(tally.prompts), resamples, seed)
        replicas, _ = _fit(tally, tally.counts[draws].sum(axis=1), ridge)
        replica_strengths = replicas[:, :-1]
    else:
        replica_strengths = np.zeros((1, len(systems)))
    low, high = percentile_interval(replica_strengths, confidence)
    # The wider of the bootstrap's interval and the fit's own (module docstring): the Laplace covariance of the
    # log-strengths centred on their mean, P C P with P = I - 1 1^T / k (uncentred, the pin's own variance made
    # every interval wider, and 30 prompts' covered the truth 99.9% of the time).
    centring = np.eye(len(systems)) - 1 / len(systems)
    covariance = centring @ np.linalg.inv(hessian[0])[:-1, :-1] @ centring
    spread = ndtri((1 + confidence) / 2) * np.sqrt(np.clip(np.diag(covariance), 0, None))
    low, high = np.minimum(low, strengths - spread), np.maximum(high, strengths + spread)
    order = np.argsort(-strengths, kind="stable")
    top, second = order[0], order[1]
    comparisons = tally.comparisons()
    standings: list[Standing] = []
    for position, k in enumerate(order):
        # Level with the one above: its rank (two systems that each won 7 of 8 were ranked 1 and 2 by the sort)
        level = position > 0 and strengths[order[position - 1]] - strengths[k] <= STRENGTH_TIE
        standings.append(Standing(system=tally.systems[k], strength=float(strengths[k]), low=float(low[k]),
                                  high=float(high[k]), rank=standings[-1].rank if level else position + 1,
                                  comparisons=int(comparisons[k])))
    return Ranking(
        standings=standings, tie_parameter=float(np.exp(point[0, -1])) if tally.has_ties else 0.0,
        top_beats_second=(float((replica_strengths[:, top] - replica_strengths[:, second] > STRENGTH_TIE).mean())
                          if tally.prompts else 0.0),
        ratings=len(verdicts), prompts=len(tally.prompts),
        head_to_head=head_to_head(verdicts, tally.systems[top], tally.systems[second]),
    )


def head_to_head(verdicts: Sequence[Verdict], top: str, second: str) -> HeadToHead:
    """`top`'s direct comparisons with `second`, whichever side each was shown on, one per item (prompt, seed): its
    first verdict that is not a tie, in the order given (a majority could flip as verdicts came in, which Ville's
    bound does not allow: 8.5% of equal pairs reached 20 with 50 raters an item, a review's simulation); and their
    evidence. Items judged only as ties count as ties."""
    decided: dict[tuple[str, int], str] = {}
    judged: set[tuple[str, int]] = set()
    for verdict in verdicts:
        if {verdict.left, verdict.right} == {top, second}:
            item = (verdict.prompt, verdict.seed)
            judged.add(item)
            if verdict.winner != TIE:
                decided.setdefault(item, verdict.winner)
    wins = sum(winner == top for winner in decided.values())
    losses = len(decided) - wins
    return HeadToHead(top, second, wins, losses, len(judged) - len(decided), head_to_head_evidence(wins, losses))


def direct_test_passes(duel: HeadToHead, evidence: float = SEPARATION_EVIDENCE) -> bool:
    """The top system's direct comparisons with the second favour it with an e-value of at least `evidence`: the
    evidence says they differ, the wins say which way."""
    return duel.wins > duel.losses and duel.evidence >= evidence


def stopping(ranking: Ranking, budget: int | None = None, separation: float = SEPARATION,
             evidence: float = SEPARATION_EVIDENCE) -> Stop:
    """The campaign may stop when the top system is separated from the second: it beats the second in at least
    `separation` of the bootstrap resamples over prompts (a one-sided 95% bootstrap test of their difference, which
    counts verdicts on one prompt as one), on at least `MIN_SEPARATION_PROMPTS` prompts, and their direct comparisons
    (one per item) favour the top system with an e-value of at least `evidence` (the test that stays valid when the
    rule is checked after every rating); or when
    `budget` ratings are in. The reason says which (separation first when both hold)."""
    needed = max(0, MIN_SEPARATION_PROMPTS - ranking.prompts)
    bootstrap = ranking.top_beats_second >= separation
    direct = direct_test_passes(ranking.head_to_head, evidence)
    if not needed and bootstrap and direct:
        return Stop(True, "separated", 0, bootstrap, direct)
    if budget is not None and ranking.ratings >= budget:
        return Stop(True, "budget", needed, bootstrap, direct)
    return Stop(False, None, needed, bootstrap, direct)


def separated(verdicts: Sequence[Verdict], systems: Sequence[str], resamples: int = DEFAULT_RESAMPLES,
              ridge: float = RIDGE) -> bool:
    """Whether `stopping(rank_systems(verdicts, systems, resamples))` says "separated", the bootstrap skipped when the
    direct comparisons of the point fit's top two (rank_systems' top two) do not pass, since then it cannot: a
    campaign asks before issuing each pair, and the bootstrap refits `resamples` times."""
    if not verdicts:
        return False
    tally = _Tally(verdicts, systems)
    point, _ = _fit(tally, tally.counts.sum(axis=0, keepdims=True), ridge)
    top, second = np.argsort(-point[0, :-1], kind="stable")[:2]  # as rank_systems orders them
    if not direct_test_passes(head_to_head(verdicts, tally.systems[top], tally.systems[second])):
        return False
    return stopping(rank_systems(verdicts, systems, resamples=resamples, ridge=ridge)).reason == "separated"


def verdict_information(strengths: np.ndarray, pairs: np.ndarray, tie_parameter: float) -> np.ndarray:
    """Fisher information one verdict on each pair (i, j) of `pairs` adds along theta_i - theta_j, on the
    scale of the fit's Hessian: the precision matrix grows by it times c c^T (c = e_i - e_j). The outcome's
    coefficients in (theta_i, theta_j) are (1, 0), (0, 1) or (1/2, 1/2) (Davidson), whose covariance is
    Var(+1/2, -1/2, 0) c c^T = (p_i + p_j - (p_i - p_j)^2) / 4 c c^T. (Without the / 4 a verdict counted
    as four: the lookahead then overrated how far one verdict moves the estimate.)"""
    s, t = strengths[pairs[:, 0]], strengths[pairs[:, 1]]
    tie_logit = np.log(tie_parameter) + (s + t) / 2 if tie_parameter > 0 else np.full_like(s, -np.inf)
    logits = np.stack([s, t, tie_logit])
    p = np.exp(logits - logsumexp(logits, axis=0))
    return (p[0] + p[1] - (p[0] - p[1]) ** 2) / 4


def expected_order_gain(strengths: np.ndarray, covariance: np.ndarray,
                        tie_parameter: float) -> tuple[np.ndarray, np.ndarray]:
    """For every pair (i < j), how much one more verdict on it is expected to lower the chance that
    the ranking is wrong between neighbours: the sum, over systems next to each other in the order of
    `strengths` (d >= 0 their estimated difference, v its variance under the Laplace approximation
    with `covariance`), of the probability that their order is wrong now, Phi(-d / sqrt(v)), minus its
    expectation once the verdict is in. The verdict's information (`verdict_information`) along the
    candidate's difference removes s from v (a rank-one update, Sherman-Morrison), and moves the
    estimate of d by an amount not known yet: N(0, s) before the verdict (preposterior; v = s + a^2,
    a^2 the variance after). So the expected probability after is E[Phi(-|X| / a)], X ~ N(d, s), which is
    2 T(d / sqrt(v), a / sqrt(s)) with Owen's T (closed form: the bivariate normal's, whose second T
    term vanishes here). Taking the estimate as fixed instead (Phi(-d / a) after) gave a neighbour pair
    with d ~ 0, the least settled, no gain at all. A candidate far from every uncertain neighbour pair,
    or a settled neighbour pair, gains ~0. Neighbours only, because almost every mis-ordered pair of a
    nearly right ranking is one (Kendall's tau >= 0.9 of 8 systems allows one); summing over all pairs
    spent ratings on far pairs. Returns (pairs, gains)."""
    k = len(strengths)
    first, second = np.triu_indices(k, 1)
    pairs = np.stack([first, second], axis=1)
    order = np.argsort(strengths, kind="stable")
    lower, upper = order[:-1], order[1:]  # neighbour e: d_e = theta_upper - theta_lower
    differences = strengths[upper] - strengths[lower]  # >= 0
    # Covariances by indexing rather than contrast matrices: the (neighbours x candidates) products are
    # what a 60-system campaign's GET /pair pays for.
    along = covariance[upper] - covariance[lower]  # (neighbours, k): Cov(d_e, theta)
    shared = along[:, first] - along[:, second]  # Cov(d_e, theta_i - theta_j)
    neighbour_variances = np.clip(along[np.arange(k - 1), upper] - along[np.arange(k - 1), lower], 1e-12, None)
    candidate_variances = covariance[first, first] + covariance[second, second] - 2 * covariance[first, second]
    information = verdict_information(strengths, pairs, tie_parameter)
    removed = information[None, :] * shared**2 / (1.0 + information * candidate_variances)[None, :]
    removed = np.clip(removed, 1e-300, neighbour_variances[:, None] * (1 - 1e-12))
    after = neighbour_variances[:, None] - removed
    standardised = differences / np.sqrt(neighbour_variances)
    wrong_now = ndtr(-standardised)
    wrong_after = 2 * owens_t(standardised[:, None], np.sqrt(after / removed))
    gains = (wrong_now[:, None] - wrong_after).sum(axis=0)
    return pairs, gains


def next_pair(verdicts: Sequence[Verdict], systems: Sequence[str], items: Sequence[tuple[str, int]], rater: str,
              generator: np.random.Generator, exploration: float = EXPLORATION, ridge: float = RIDGE,
              one_round: bool = False, held: Sequence[Pair] = ()) -> Pair | None:
    """The next pair for `rater`: with probability `exploration` a uniformly random pair, else the pair
    with the largest `expected_order_gain` at the fitted strengths and their Laplace covariance (the
    penalised Hessian's inverse); only pairs this rater can still be shown, i.e.
    with an item (prompt, seed) of `items` on which they have not judged that pair. With `one_round` (a campaign whose
    budget is one rating per pair and item at most: the default), of those, while any has one, the pairs with an
    item nobody has judged them on: the round is covered, every pair judged on every item once (two raters of a
    walk-through spent 4 of its 12 ratings on one pair, twice per item, and never compared the top two systems);
    `held`, the pairs other raters have been shown and not answered yet, count as judged there (raters rating at
    the same time were shown the same pair on the same item, the choice being the same for all until a verdict).
    Without it, a pair may be judged again on an item another rater judged (a tie there is no direct comparison yet):
    bench/separation.py's campaigns of 1,200 ratings on 720 pair-items separated 0.6 and 0.7 preferences in fewer
    ratings than when every pair-item had to be judged once first (0.7: 90th percentile 587 ratings, against 693).
    The item is the one that pair has been judged on least (then the item judged least overall: prompts and seeds
    spread evenly), sides drawn at random. None when the rater has judged every pair on every item.
    Deterministic given `generator`'s state."""
    systems = list(systems)
    if len(systems) < 2:
        raise ValueError("a campaign needs at least two systems")
    index = {name: k for k, name in enumerate(systems)}
    seen_by_rater: set[tuple[int, int, str, int]] = set()
    pair_item_count: dict[tuple[int, int, str, int], int] = {}
    item_count: dict[tuple[str, int], int] = {}
    for v in verdicts:
        a, b = sorted((index[v.left], index[v.right]))
        key = (a, b, v.prompt, v.seed)
        pair_item_count[key] = pair_item_count.get(key, 0) + 1
        item_count[(v.prompt, v.seed)] = item_count.get((v.prompt, v.seed), 0) + 1
        if v.rater == rater:
            seen_by_rater.add(key)
    for pair in held if one_round else ():
        key = (*sorted((index[pair.left], index[pair.right])), pair.prompt, pair.seed)
        pair_item_count[key] = pair_item_count.get(key, 0) + 1
        item_count[(pair.prompt, pair.seed)] = item_count.get((pair.prompt, pair.seed), 0) + 1
    all_pairs = [(i, j) for i in range(len(systems)) for j in range(i + 1, len(systems))]
    open_pairs = [(i, j) for i, j in all_pairs if any((i, j, p, s) not in seen_by_rater for p, s in items)]
    if not open_pairs:
        return None
    if one_round:
        unjudged = [(i, j) for i, j in open_pairs if any((i, j, p, s) not in pair_item_count for p, s in items)]
        open_pairs = unjudged or open_pairs
    if generator.random() < exploration:
        i, j = open_pairs[generator.integers(len(open_pairs))]
    else:
        tally = _Tally(verdicts, systems)
        x, hessian = _fit(tally, tally.counts.sum(axis=0, keepdims=True), ridge)
        covariance = np.linalg.inv(hessian[0])[:-1, :-1]  # the log-strengths' block (log nu marginalised)
        tie_parameter = float(np.exp(x[0, -1])) if tally.has_ties else 0.0
        # At the estimate, not at a posterior draw: the gain already averages over what the verdict may
        # say (preposterior), so a neighbour pair that only looks settled after an unlucky early estimate
        # keeps a gain as large as its misorder is plausible. A draw on top of it only added noise (a
        # replica of bench/campaign.py's simulation, 120 runs on other seeds: 240 ratings at a draw, 160
        # at the estimate).
        # Deterministic but for exact ties: raters asking at once, before any of their verdicts is in, get
        # the same pair (on the items the spreading rule gives each), until its verdicts lower its gain.
        pairs, gains = expected_order_gain(x[0, :-1], covariance, tie_parameter)
        still_open = set(open_pairs)
        is_open = np.array([(int(i), int(j)) in still_open for i, j in pairs])
        gains = np.where(is_open, gains, -np.inf)
        best = np.flatnonzero(gains >= gains.max() - 1e-12 * max(1.0, abs(gains.max())))
        i, j = pairs[best[generator.integers(len(best))]]
    candidates = [(p, s) for p, s in items if (i, j, p, s) not in seen_by_rater]

    def use(item):  # how often this pair was judged on the item, then how often the item was at all
        return pair_item_count.get((i, j, *item), 0), item_count.get(item, 0)

    least = min(use(item) for item in candidates)
    candidates = [item for item in candidates if use(item) == least]
    prompt, seed = candidates[generator.integers(len(candidates))]
    left, right = (systems[i], systems[j]) if generator.random() < 0.5 else (systems[j], systems[i])
    return Pair(left=left, right=right, prompt=prompt, seed=int(seed))
