"""Bradley-Terry ranking of many systems (slapgen.evaluation.ranking), against references: closed
forms, the Davidson likelihood written out here and maximised by scipy, and simulation."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import minimize
from scipy.stats import norm

from slapgen.evaluation.ranking import (
    LEFT, MIN_SEPARATION_PROMPTS, OUTCOMES, RIDGE, RIGHT, STRENGTH_TIE, TIE, Pair, Ranking, Verdict, expected_order_gain,
    fit_strengths, head_to_head, head_to_head_evidence, next_pair, rank_systems, stopping,
)


def simulate(generator, strengths, nu, pairs, prompt, seed=0, rater="r"):
    """Verdicts drawn from Davidson's model: P(i) : P(j) : P(tie) = e^ti : e^tj : nu e^((ti + tj) / 2)."""
    out = []
    names = sorted(strengths)
    for i, j in pairs:
        ti, tj = strengths[names[i]], strengths[names[j]]
        weights = np.array([np.exp(ti), np.exp(tj), nu * np.exp((ti + tj) / 2)])
        outcome = OUTCOMES[generator.choice(3, p=weights / weights.sum())]
        out.append(Verdict(names[i], names[j], outcome, prompt, seed, rater))
    return out


def repeat(left, right, outcome, times, prompt="p", rater="r"):
    return [Verdict(left, right, outcome, f"{prompt}{k}", 0, rater) for k in range(times)]


def test_fit_recovers_known_strengths_from_simulated_verdicts():
    """Guards the Bradley-Terry fit: 6,000 simulated verdicts (with ties) among 6 systems give back the
    log-strengths that drew them (centred), within 0.12."""
    generator = np.random.default_rng(0)
    truth = dict(zip("abcdef", [-1.0, -0.6, -0.1, 0.2, 0.5, 1.0]))
    pairs = [tuple(generator.choice(6, 2, replace=False)) for _ in range(6000)]
    verdicts = simulate(generator, truth, 0.6, pairs, "p")
    fitted = fit_strengths(verdicts, list(truth))
    centred = np.array(list(truth.values())) - np.mean(list(truth.values()))
    assert np.abs(np.array(list(fitted.values())) - centred).max() < 0.12
    assert abs(sum(fitted.values())) < 1e-9


def test_fit_without_ties_equals_the_closed_form_maximum():
    """Guards the likelihood: on a chain a-b, b-c (no ties, no ridge) the maximum is known in closed form,
    theta_a - theta_b = log(7 / 3), theta_b - theta_c = log(4 / 6), mean 0."""
    verdicts = (repeat("a", "b", LEFT, 7) + repeat("b", "a", LEFT, 3) + repeat("b", "c", LEFT, 4)
                + repeat("c", "b", LEFT, 6))
    fitted = fit_strengths(verdicts, ["a", "b", "c"], ridge=0.0)
    ab, bc = np.log(7 / 3), np.log(4 / 6)
    expected = np.array([ab + bc, bc, 0.0])
    expected -= expected.mean()
    np.testing.assert_allclose([fitted["a"], fitted["b"], fitted["c"]], expected, atol=1e-8)


def test_fit_with_ties_equals_the_handwritten_penalised_likelihood_maximum():
    """Guards Davidson's tie model and the ridge: the fit equals the maximum, found by scipy, of the
    penalised log-likelihood written out here term by term."""
    counts = {("a", "b"): (6, 2, 3), ("b", "c"): (3, 4, 2), ("a", "c"): (8, 1, 1)}  # (first wins, second, ties)
    verdicts = []
    for (x, y), (wx, wy, ties) in counts.items():
        # Sides mixed: x's wins shown on the left, y's on the right.
        verdicts += repeat(x, y, LEFT, wx) + repeat(x, y, RIGHT, wy) + repeat(y, x, TIE, ties)

    def negative(params):
        theta = dict(zip("abc", params[:3]))
        nu = np.exp(params[3])
        total = 0.0
        for (x, y), (wx, wy, ties) in counts.items():
            tie = nu * np.sqrt(np.exp(theta[x]) * np.exp(theta[y]))
            d = np.exp(theta[x]) + np.exp(theta[y]) + tie
            total += wx * np.log(np.exp(theta[x]) / d) + wy * np.log(np.exp(theta[y]) / d) + ties * np.log(tie / d)
        return -total + RIDGE / 2 * (np.sum(params[:3] ** 2) + params[3] ** 2)

    reference = minimize(negative, np.zeros(4), method="BFGS", options={"gtol": 1e-10})
    fitted = fit_strengths(verdicts, ["a", "b", "c"])
    np.testing.assert_allclose([fitted[s] for s in "abc"], reference.x[:3], atol=1e-5)
    ranking = rank_systems(verdicts, ["a", "b", "c"], resamples=50)
    assert ranking.tie_parameter == pytest.approx(np.exp(reference.x[3]), rel=1e-4)


def test_all_wins_and_no_comparisons_stay_finite():
    """Guards the ridge: a system that won every comparison gets a finite strength (the maximum likelihood
    one is infinite) and a system never compared sits at the mean, 0."""
    verdicts = (repeat("a", "b", LEFT, 10) + repeat("a", "c", LEFT, 10) + repeat("b", "c", LEFT, 5)
                + repeat("c", "b", LEFT, 5))
    fitted = fit_strengths(verdicts, ["a", "b", "c", "unseen"])
    assert np.isfinite(list(fitted.values())).all()
    assert fitted["a"] == max(fitted.values()) and fitted["a"] < 10
    assert fitted["unseen"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("prompts", [6, 30])
def test_intervals_cover_the_truth_at_about_the_nominal_rate(prompts):
    """Guards the intervals: in 200 simulated studies (4 systems, every pair once per prompt), the 95% interval of
    each centred log-strength covers the truth in 92-98.5% of the 800 cases, on 30 prompts and on 6. The percentile
    bootstrap alone is narrow over few prompts (0.885 at 12 prompts; after one rating [1.06, 1.06], a walk-through's
    find); the Laplace interval alone ignores that a prompt's verdicts go together; the wider of the two holds."""
    generator = np.random.default_rng(1)
    truth = dict(zip("abcd", [-0.6, -0.2, 0.2, 0.6]))
    pairs = list(itertools.combinations(range(4), 2))
    covered = []
    for study in range(200):
        verdicts = [v for p in range(prompts) for v in simulate(generator, truth, 0.5, pairs, f"p{p}")]
        ranking = rank_systems(verdicts, list(truth), resamples=200, seed=study)
        covered += [s.low <= truth[s.system] <= s.high for s in ranking.standings]
    assert 0.92 <= np.mean(covered) <= 0.985, np.mean(covered)


def test_one_verdict_leaves_every_strength_uncertain():
    """Guards the interval of one rating: the bootstrap over its one prompt has one resample, so the winner's
    interval was a point ([1.06, 1.06]). It is the Laplace interval now: the centred log-strength's standard
    deviation from the penalised Hessian, written out here for a 2-system fit (the ridge's prior, a verdict's
    information p (1 - p) at the fitted difference, and the pin on the mean)."""
    ranking = rank_systems([Verdict("a", "b", LEFT, "p0", 0, "r")], ["a", "b"], resamples=50)
    fitted = {s.system: s for s in ranking.standings}
    d = fitted["a"].strength - fitted["b"].strength
    information = np.exp(d) / (1 + np.exp(d)) ** 2  # p (1 - p) of the one verdict at the fit
    hessian = np.array([[information + RIDGE + 1, -information + 1], [-information + 1, information + RIDGE + 1]])
    centring = np.eye(2) - 0.5
    sd = np.sqrt((centring @ np.linalg.inv(hessian) @ centring)[0, 0])
    for standing in ranking.standings:
        assert standing.low == pytest.approx(standing.strength - 1.959964 * sd, rel=1e-5)
        assert standing.high == pytest.approx(standing.strength + 1.959964 * sd, rel=1e-5)
    assert fitted["a"].low < 0 < fitted["a"].high  # one verdict does not place a above the mean


def test_ranks_and_stopping_rule():
    """Guards the stopping rule: a top system that beats the second on most prompts is 'separated'; two
    equal leaders are not, until the budget is reached ('budget')."""
    generator = np.random.default_rng(2)
    pairs = list(itertools.combinations(range(3), 2))
    clear = {"a": 2.0, "b": 0.0, "c": -2.0}
    verdicts = [v for p in range(20) for v in simulate(generator, clear, 0.3, pairs * 2, f"p{p}")]
    ranking = rank_systems(verdicts, list(clear), resamples=300)
    assert [s.system for s in ranking.standings] == ["a", "b", "c"] and [s.rank for s in ranking.standings] == [1, 2, 3]
    assert ranking.top_beats_second >= 0.95
    assert stopping(ranking, budget=10_000) == stopping(ranking) and stopping(ranking).reason == "separated"
    level = {"a": 0.0, "b": 0.0, "c": -2.0}
    verdicts = [v for p in range(5) for v in simulate(generator, level, 0.3, pairs, f"p{p}")]
    ranking = rank_systems(verdicts, list(level), resamples=300)
    assert ranking.top_beats_second < 0.95
    assert not stopping(ranking, budget=100).done and stopping(ranking, budget=100).reason is None
    assert stopping(ranking, budget=len(verdicts)).reason == "budget"


def test_systems_of_equal_strength_share_a_rank():
    """Guards ranks given by the sort alone: two systems that each beat the third on the same prompts (a walk-through's
    tuned run and base model, 7 of 8 each, identical strengths and intervals) were ranked 1 and 2, and a campaign
    of ties only ranked its five systems 1 to 5 in no order. Equal strengths (within STRENGTH_TIE) share the rank
    of the first of them, the next rank skipping theirs (1, 1, 3)."""
    mirrored = [Verdict(x, "c", LEFT, f"p{k}", 0, "r") for k in range(4) for x in ("a", "b")]
    ranking = rank_systems(mirrored, ["a", "b", "c"], resamples=50)
    assert abs(ranking.standings[0].strength - ranking.standings[1].strength) <= STRENGTH_TIE
    assert [s.rank for s in ranking.standings] == [1, 1, 3]
    ties = [Verdict(x, y, TIE, "p0", 0, "r") for x, y in itertools.combinations("abcde", 2)]
    assert [s.rank for s in rank_systems(ties, list("abcde"), resamples=50).standings] == [1] * 5


def test_few_prompts_or_a_tie_never_separate():
    """Guards a campaign called done after one verdict: over one prompt every bootstrap resample is the
    same, so the leader beat the second in 100% of them; after a single tie the leader was ahead by
    rounding (3.9e-16) in every resample. Separation needs MIN_SEPARATION_PROMPTS prompts and a
    difference larger than rounding."""
    systems = ["a", "b", "c"]
    one = [Verdict("a", "b", LEFT, "p0", 0, "r")]
    ranking = rank_systems(one, systems, resamples=200)
    assert ranking.top_beats_second == 1.0 and ranking.prompts == 1  # the degenerate bootstrap itself
    assert not stopping(ranking).done
    tie = rank_systems([Verdict("a", "c", TIE, "p0", 0, "r")], systems, resamples=200)
    assert tie.top_beats_second == 0.0 and not stopping(tie).done
    four = [Verdict("a", "b", LEFT, f"p{k}", 0, "r") for k in range(MIN_SEPARATION_PROMPTS - 1)]
    assert not stopping(rank_systems(four, systems, resamples=200)).done
    five = [*four, Verdict("a", "b", LEFT, "p-last", 0, "r")]
    five_ranked = rank_systems(five, ["a", "b"], resamples=200)
    # Every resample of five prompts that all favour a over b keeps a ahead: the bootstrap's own answer. But 5 wins
    # on 5 items are evidence 2^5 / 6 = 5.3 (`head_to_head_evidence`), under the 20 separation needs.
    assert five_ranked.top_beats_second == 1.0 and five_ranked.head_to_head.evidence == pytest.approx(32 / 6)
    stop = stopping(five_ranked)
    assert (stop.done, stop.bootstrap_separates, stop.head_to_head_separates) == (False, True, False)
    eight = [Verdict("a", "b", LEFT, f"p{k}", 0, "r") for k in range(8)]
    assert stopping(rank_systems(eight, ["a", "b"], resamples=200)).reason == "separated"  # 2^8 / 9 = 28.4
    # Three raters agreeing on 5 items are 5 comparisons, not 15: the same two videos, judged together.
    crowd = [Verdict("a", "b", LEFT, f"p{k}", 0, rater) for k in range(5) for rater in ("r", "s", "t")]
    assert rank_systems(crowd, ["a", "b"], resamples=50).head_to_head.wins == 5
    assert not stopping(rank_systems(crowd, ["a", "b"], resamples=50)).done
    # With a third system never compared, c (at the mean) is second: a's wins over b say nothing of c.
    assert rank_systems(eight, systems, resamples=200).head_to_head.top == "a"
    assert not stopping(rank_systems(eight, systems, resamples=200)).done


def test_head_to_head_evidence_is_the_mixture_sign_test_written_out():
    """Guards the e-value separation rests on: 2^n times the integral of p^w (1 - p)^l over [0, 1] (two-sided: a
    one-sided mixture checked in the direction of whoever led reached 20 for 7.4% of equal pairs), by numerical
    integration; per item its first verdict that is not a tie (a majority could flip as verdicts came in, which the
    bound does not allow), items judged only as ties counting for neither side; sides do not matter."""
    for wins, losses in [(0, 0), (8, 0), (7, 0), (9, 3), (3, 9), (40, 25)]:
        integral, _ = quad(lambda p: p**wins * (1 - p) ** losses, 0, 1)
        assert head_to_head_evidence(wins, losses) == pytest.approx(2 ** (wins + losses) * integral, rel=1e-9)
    # item p0: a twice (left, then right); p1: b; p2: a tie, then a, then b twice (its first decisive verdict: a);
    # p3: only a tie.
    verdicts = [Verdict("a", "b", LEFT, "p0", 0, "r"), Verdict("b", "a", RIGHT, "p0", 0, "s"),
                Verdict("b", "a", LEFT, "p1"), Verdict("a", "b", TIE, "p2", 0, "q"), Verdict("a", "b", LEFT, "p2", 0, "r"),
                Verdict("a", "b", RIGHT, "p2", 0, "s"), Verdict("b", "a", LEFT, "p2", 0, "t"), Verdict("a", "b", TIE, "p3")]
    duel = head_to_head(verdicts, "a", "b")
    assert (duel.top, duel.second, duel.wins, duel.losses, duel.ties) == ("a", "b", 2, 1, 1)
    assert duel.evidence == head_to_head_evidence(2, 1)


def test_a_leader_behind_in_its_direct_comparisons_is_not_separated_and_that_is_said():
    """Guards the `wins > losses` condition, which no test held, and a leaderboard that read "not yet" beside two
    tests that looked passed (a review's case): a ranked first by its wins over c, while b won every direct
    comparison with a (evidence 51.2, in b's favour). Not separated, and the sentence says b is ahead of it."""
    from slapgen.evaluation.leaderboard import criterion_board

    verdicts = ([Verdict("a", "c", LEFT, f"p{k % 10}", k // 10, "r") for k in range(50)]
                + [Verdict("b", "c", LEFT if k < 30 else RIGHT, f"p{k % 10}", k // 10, "s") for k in range(50)]
                + [Verdict("a", "b", RIGHT, f"p{k}", 9, "t") for k in range(9)])
    ranking = rank_systems(verdicts, ["a", "b", "c"], resamples=200)
    duel = ranking.head_to_head
    assert (ranking.standings[0].system, duel.second, duel.wins, duel.losses) == ("a", "b", 0, 9)
    assert duel.evidence == pytest.approx(2**9 / 10) and duel.evidence > 20
    stop = stopping(ranking)
    assert not stop.done and not stop.head_to_head_separates
    why = criterion_board(verdicts, [], ["a", "b", "c"], None, {}, {}, {}, resamples=200)["why"]
    assert why.startswith("not yet: a beats the second in ") and why.endswith(
        "but b is ahead of it in their direct comparisons (9 of 9 items, each item's first verdict that is not a tie)")


def test_equal_systems_are_rarely_called_separated_when_the_rule_is_checked_after_every_rating():
    """Guards the stopping rule picking a winner from noise (a walk-through's find): with equal systems and
    coin-flip raters, the bootstrap's 95% share alone, checked after every rating as the leaderboard does, ended
    62 of 100 simulated campaigns "separated" (3 systems, 6 prompts, one rater), some at the 5th rating. Here 30
    campaigns of 3 systems on 6 prompts x 2 seeds with 3 raters, through the service's own `next_pair`,
    `rank_systems` and `stopping`: the bootstrap alone (evidence 0) separates at least a third of them, the whole
    rule at most 2."""
    systems, items = ["s0", "s1", "s2"], [(f"p{k}", seed) for k in range(6) for seed in (0, 1)]
    separated = {0.0: 0, 20.0: 0}
    for run in range(30):
        chooser, coin = np.random.default_rng(run), np.random.default_rng(10_000 + run)
        verdicts, open_rules = [], set(separated)
        while len(verdicts) < 60 and open_rules:
            rater = f"r{len(verdicts) % 3}"
            pair = next_pair(verdicts, systems, items, rater, chooser)
            verdicts.append(Verdict(pair.left, pair.right, LEFT if coin.random() < 0.5 else RIGHT, pair.prompt,
                                    pair.seed, rater))
            ranking = rank_systems(verdicts, systems, resamples=200)
            for evidence in list(open_rules):
                if stopping(ranking, evidence=evidence).done:
                    separated[evidence] += 1
                    open_rules.discard(evidence)
    assert separated[0.0] >= 10 and separated[20.0] <= 2, separated


def test_separated_answers_as_stopping_after_the_full_bootstrap_does():
    """Guards the shortcut a campaign takes before issuing each pair (`separated` skips the bootstrap when the point
    fit's top two do not pass the direct test): on verdict sets from equal to clearly ordered systems, cut at every
    size, it equals `stopping(rank_systems(...)).reason == "separated"` computed in full, and both answers occur."""
    from slapgen.evaluation.ranking import separated

    systems, items = ["s0", "s1", "s2"], [(f"p{k}", seed) for k in range(6) for seed in (0, 1, 2)]
    answers = []
    for run, gap in enumerate((0.0, 0.7, 1.5, 3.0)):
        nature = np.random.default_rng(run)
        strengths = {"s0": gap, "s1": 0.0, "s2": -gap}
        verdicts = []
        for k in range(60):
            left, right = nature.choice(systems, 2, replace=False)
            prompt, seed = items[k % len(items)]
            p_left = 1 / (1 + np.exp(strengths[right] - strengths[left]))
            verdicts.append(Verdict(left, right, LEFT if nature.random() < p_left else RIGHT, prompt, seed, f"r{k % 3}"))
        for size in range(0, 61, 6):
            full = stopping(rank_systems(verdicts[:size], systems)).reason == "separated"
            assert separated(verdicts[:size], systems) == full, (gap, size)
            answers.append(full)
    assert True in answers and False in answers


def _davidson_log_probabilities(theta, i, j, nu):
    """log P(i wins), log P(j wins), log P(tie) of one verdict on (i, j), Davidson's model written out."""
    win_i, win_j, tie = np.exp(theta[i]), np.exp(theta[j]), nu * np.exp((theta[i] + theta[j]) / 2)
    total = win_i + win_j + tie
    return np.log([win_i / total, win_j / total, tie / total])


def _expected_fisher_information(theta, i, j, nu, step=1e-4):
    """E over the outcome of minus the Hessian of its log-probability in theta, by central differences."""
    k = len(theta)
    probabilities = np.exp(_davidson_log_probabilities(theta, i, j, nu))
    information = np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            def shifted(da, db):
                x = np.array(theta, dtype=float)
                x[a] += da
                x[b] += db
                return _davidson_log_probabilities(x, i, j, nu)
            second = (shifted(step, step) - shifted(step, -step) - shifted(-step, step) + shifted(-step, -step)) / (
                4 * step * step)
            information[a, b] = -(probabilities * second).sum()
    return information


def _expected_wrong_after(difference, variance_removed, variance_after):
    """E[Phi(-|X| / sqrt(variance_after))], X ~ N(difference, variance_removed), by numerical integration."""
    from scipy.integrate import quad

    spread = np.sqrt(variance_removed)

    def integrand(z):
        return norm.pdf(z) * norm.cdf(-abs(difference + spread * z) / np.sqrt(variance_after))

    return quad(integrand, -12, 12, points=[-difference / spread], limit=200, epsabs=1e-13)[0]


def test_expected_order_gain_equals_the_preposterior_update_written_out():
    """Guards the pair-choice score: each pair's gain equals, summed over neighbours (systems next to each
    other in the estimated order), P(their order is wrong) now minus its expectation after one verdict on
    that pair. References written out here: the verdict's Fisher information is the expected negative
    Hessian of Davidson's log-probabilities (finite differences), added to the precision matrix and
    inverted again; the expectation integrates over the estimate's move N(0, variance removed) by
    quadrature. Fails with the information counted four times (the outcome's +1/-1/0 variance without
    its 1/4) and with the estimate held fixed (Phi(-d / sd after): no gain for a neighbour pair at d = 0)."""
    generator = np.random.default_rng(3)
    strengths = np.array([0.9, 0.1, 0.1, -1.0])  # two neighbours exactly level: d = 0
    a = generator.normal(size=(4, 4))
    covariance = a @ a.T / 8 + 0.05 * np.eye(4)
    nu = 0.4
    pairs, gains = expected_order_gain(strengths, covariance, nu)
    order = np.argsort(strengths, kind="stable")
    for (i, j), gain in zip(pairs, gains):
        updated = np.linalg.inv(np.linalg.inv(covariance) + _expected_fisher_information(strengths, i, j, nu))
        expected = 0.0
        for low, high in zip(order[:-1], order[1:]):
            contrast = np.zeros(4)
            contrast[high], contrast[low] = 1.0, -1.0
            difference = contrast @ strengths
            variance_now, variance_after = contrast @ covariance @ contrast, contrast @ updated @ contrast
            expected += norm.cdf(-difference / np.sqrt(variance_now)) - _expected_wrong_after(
                difference, variance_now - variance_after, variance_after)
        assert gain == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_adaptive_choice_picks_the_uncertain_neighbours():
    """Guards the adaptive pair choice: a > b ~ c > d, every pair measured 40 times except b-c (twice):
    with no exploration the next pair is b-c (the one verdict that can still change the order), not a
    settled one, for any seed."""
    verdicts = []
    for x, y in [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]:
        verdicts += repeat(x, y, LEFT, 34, prompt=f"{x}{y}") + repeat(y, x, LEFT, 6, prompt=f"{y}{x}")
    verdicts += [Verdict("b", "c", LEFT, "q", 0), Verdict("c", "b", LEFT, "q", 1)]
    items = [(f"q{k}", 0) for k in range(5)]
    for seed in range(5):
        pair = next_pair(verdicts, list("abcd"), items, "new rater", np.random.default_rng(seed), exploration=0.0)
        assert {pair.left, pair.right} == {"b", "c"}


def test_adaptive_choice_asks_about_neighbours_level_in_the_estimate():
    """Guards the preposterior gain: a beat b and c 6-2 each, b and c split 2-2, so b and c are exactly level
    in the estimate and their order is a coin toss (P(wrong) = 1/2, the largest there is), while a's lead
    is clearer: the next pair is b-c for every seed. Holding the estimate fixed (the earlier rule) gave
    level neighbours no gain of their own (Phi(0) before and after), so it chose a-b or a-c at the
    estimate and at a third of its posterior draws."""
    verdicts = []
    for x, y, times in [("a", "b", 6), ("b", "a", 2), ("a", "c", 6), ("c", "a", 2), ("b", "c", 2), ("c", "b", 2)]:
        verdicts += repeat(x, y, LEFT, times, prompt=f"{x}{y}")
    items = [(f"q{k}", 0) for k in range(5)]
    for seed in range(20):
        pair = next_pair(verdicts, list("abc"), items, "new rater", np.random.default_rng(seed), exploration=0.0)
        assert {pair.left, pair.right} == {"b", "c"}, seed


def test_next_pair_never_repeats_and_spreads_items():
    """Guards the pair choice's bookkeeping: one rater is never shown the same (pair, prompt, seed) twice,
    gets None once all are shown, each pair's items are used evenly across raters, and the same
    generator seed gives the same sequence."""
    systems = ["a", "b", "c"]
    items = [("p0", 0), ("p0", 1), ("p1", 0)]

    def campaign(seed, raters):
        generator = np.random.default_rng(seed)
        verdicts, shown = [], []
        for rater in raters:
            while (pair := next_pair(verdicts, systems, items, rater, generator)) is not None:
                shown.append((rater, pair))
                verdicts.append(Verdict(pair.left, pair.right, LEFT, pair.prompt, pair.seed, rater))
        return verdicts, shown

    verdicts, shown = campaign(0, ["r1", "r2"])
    for rater in ("r1", "r2"):
        keys = [(frozenset((p.left, p.right)), p.prompt, p.seed) for r, p in shown if r == rater]
        assert len(keys) == len(set(keys)) == 9  # 3 pairs x 3 items, each once
    assert campaign(0, ["r1", "r2"])[1] == shown
    assert campaign(1, ["r1", "r2"])[1] != shown
    # Two raters asking in turn: each pair's items are used 1 apart at most at every moment.
    generator = np.random.default_rng(5)
    verdicts = []
    for step in range(12):
        rater = "r1" if step % 2 else "r2"
        pair = next_pair(verdicts, systems, items, rater, generator)
        assert isinstance(pair, Pair)
        verdicts.append(Verdict(pair.left, pair.right, RIGHT, pair.prompt, pair.seed, rater))
        for x, y in itertools.combinations(systems, 2):
            uses = [sum({v.left, v.right} == {x, y} and (v.prompt, v.seed) == item for v in verdicts) for item in items]
            assert max(uses) - min(uses) <= 1


def test_one_round_judges_every_pair_on_every_item_once_before_any_again():
    """Guards the default budget (one rating per pair and item) leaving pairs never compared: two raters of a
    walk-through's campaign (4 systems, 2 items, 12 ratings) judged one pair on both items twice and never the top
    two. With `one_round`, raters taking turns, whatever the verdicts say (the gain then prefers some pairs), the
    first 12 ratings judge each of the 6 pairs on each item exactly once, and the next ones start a second round."""
    systems = ["a", "b", "c", "d"]
    items = [("p0", 0), ("p1", 0)]
    for seed in range(10):
        generator = np.random.default_rng(seed)
        verdicts = []
        for step in range(14):
            rater = ("r1", "r2")[step % 2]
            pair = next_pair(verdicts, systems, items, rater, generator, one_round=True)
            # "a" beats everyone, "b" the rest, ...: the fitted strengths soon tell the pairs apart
            winner = min(pair.left, pair.right)
            verdicts.append(Verdict(pair.left, pair.right, LEFT if winner == pair.left else RIGHT, pair.prompt,
                                    pair.seed, rater))
            if step == 11:
                judged = collections.Counter((frozenset((v.left, v.right)), v.prompt, v.seed) for v in verdicts)
                assert len(judged) == 12 and set(judged.values()) == {1}, (seed, judged)
        # the 13th and 14th: a second round, each on a pair and item its rater had not judged
        for v in verdicts[12:]:
            assert [(frozenset((u.left, u.right)), u.prompt, u.seed) for u in verdicts[:12] if u.rater == v.rater].count(
                (frozenset((v.left, v.right)), v.prompt, v.seed)) == 0


def test_ranking_to_json_and_errors():
    """Guards bad input: an unknown system or outcome is one sentence, not a wrong fit."""
    with pytest.raises(ValueError, match="outside the ranking: z"):
        fit_strengths([Verdict("a", "z", LEFT, "p")], ["a", "b"])
    with pytest.raises(ValueError, match="must be one of left, right, tie"):
        Verdict("a", "b", "win", "p")
    ranking = rank_systems(repeat("a", "b", LEFT, 3), ["a", "b"], resamples=20)
    assert isinstance(ranking, Ranking) and ranking.to_json()["standings"][0]["system"] == "a"
