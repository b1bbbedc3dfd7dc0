"""Agreement of pairwise verdicts (slapgen.evaluation.agreement): Krippendorff's alpha against its closed
form and the `krippendorff` package, rater consistency, and a metric's agreement and Kendall's tau
against their closed forms on small hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from slapgen.evaluation.agreement import krippendorff_alpha, metric_agreement, rater_consistency, ranking_tau
from slapgen.evaluation.ranking import LEFT, RIGHT, TIE, Verdict


def test_krippendorff_alpha_equals_the_closed_form_on_a_hand_made_case():
    """Guards the coincidence-matrix formula and the side-independence of a value: two raters on three
    units agree on a (shown on opposite sides), agree on b, disagree on the third. o_aa = o_bb = 2,
    o_ab = o_ba = 1, n_a = n_b = 3, n = 6: alpha = 1 - 5 * 2 / (3 * 3 * 2) = 4 / 9."""
    verdicts = [
        Verdict("a", "b", LEFT, "p1", 0, "r1"), Verdict("b", "a", RIGHT, "p1", 0, "r2"),
        Verdict("a", "b", RIGHT, "p2", 0, "r1"), Verdict("a", "b", RIGHT, "p2", 0, "r2"),
        Verdict("a", "b", LEFT, "p3", 0, "r1"), Verdict("a", "b", RIGHT, "p3", 0, "r2"),
    ]
    assert krippendorff_alpha(verdicts) == pytest.approx(4 / 9)
    # A rater's repeat on a unit does not count as a second coder; a lone rater's unit is not pairable.
    assert krippendorff_alpha(verdicts + [Verdict("a", "b", RIGHT, "p1", 0, "r1"),
                                          Verdict("a", "b", TIE, "p9", 0, "r3")]) == pytest.approx(4 / 9)
    assert krippendorff_alpha(verdicts[:2]) is None  # one value only: undefined


def test_krippendorff_alpha_equals_the_reference_package():
    """Guards the general case (three categories, units with 2-4 raters, missing values) against the
    `krippendorff` package on the same reliability data."""
    krippendorff = pytest.importorskip("krippendorff")
    generator = np.random.default_rng(0)
    raters, units = 4, 40
    data = np.full((raters, units), np.nan)
    verdicts = []
    for unit in range(units):
        lean = generator.choice(3, p=[0.5, 0.3, 0.2])
        for rater in generator.choice(raters, size=generator.integers(2, raters + 1), replace=False):
            value = lean if generator.random() < 0.7 else generator.choice(3)
            data[rater, unit] = value
            outcome = (LEFT, RIGHT, TIE)[value]
            verdicts.append(Verdict("x", "y", outcome, f"p{unit}", 0, f"r{rater}"))
    expected = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    assert krippendorff_alpha(verdicts) == pytest.approx(expected, abs=1e-12)


def test_rater_consistency_counts_repeats_against_the_first_verdict():
    """Guards the consistency count: r1 repeats unit (a-b, p1) twice, once the same winner on the other
    side and once a tie: 1 of 2; r2 has no repeat (rate None)."""
    verdicts = [
        Verdict("a", "b", LEFT, "p1", 0, "r1"), Verdict("b", "a", RIGHT, "p1", 0, "r1"),
        Verdict("a", "b", TIE, "p1", 0, "r1"), Verdict("a", "b", LEFT, "p1", 1, "r1"),
        Verdict("a", "b", LEFT, "p1", 0, "r2"),
    ]
    found = rater_consistency(verdicts)
    assert (found["r1"].repeats, found["r1"].consistent, found["r1"].rate) == (2, 1, 0.5)
    assert (found["r2"].repeats, found["r2"].rate) == (0, None)


def test_metric_agreement_equals_the_hand_count():
    """Guards the agreement share: per-video scores (higher better) on 6 verdicts: 1 human tie and 1
    equal score left out, 1 unscored, 3 compared of which 2 agree -> 2 / 3. Lower-is-better flips
    every compared verdict: 1 / 3. One prompt: the interval is the point."""
    scores = {("a", "p", 0): 0.9, ("b", "p", 0): 0.1, ("a", "p", 1): 0.2, ("b", "p", 1): 0.8,
              ("a", "p", 2): 0.5, ("b", "p", 2): 0.5, ("a", "p", 3): 0.7}
    verdicts = [
        Verdict("a", "b", LEFT, "p", 0), Verdict("b", "a", RIGHT, "p", 0),  # a preferred, metric agrees (x2)
        Verdict("a", "b", LEFT, "p", 1),  # a preferred, metric prefers b
        Verdict("a", "b", TIE, "p", 0), Verdict("a", "b", LEFT, "p", 2), Verdict("a", "b", LEFT, "p", 3),
    ]
    found = metric_agreement(verdicts, scores, resamples=200)
    assert (found.agreeing, found.compared, found.human_ties, found.metric_ties, found.unscored) == (2, 3, 1, 1, 1)
    assert found.rate == pytest.approx(2 / 3) and found.low == found.high == pytest.approx(2 / 3)
    assert metric_agreement(verdicts, scores, higher_is_better=False).rate == pytest.approx(1 / 3)
    per_system = metric_agreement(verdicts, {"a": 1.0, "b": 0.0})
    assert (per_system.agreeing, per_system.compared) == (5, 5)


def test_metric_agreement_interval_resamples_prompts():
    """Guards the interval: over two prompts with rates 1 and 0 (4 verdicts each), the bootstrap takes
    prompts whole, so the resampled rate is 0, 1/2 or 1 and the interval is [0, 1]."""
    verdicts = ([Verdict("a", "b", LEFT, "good", k) for k in range(4)]
                + [Verdict("a", "b", RIGHT, "bad", k) for k in range(4)])
    found = metric_agreement(verdicts, {"a": 1.0, "b": 0.0}, resamples=2000)
    assert found.rate == 0.5 and (found.low, found.high) == (0.0, 1.0) and found.prompts == 2


def test_ranking_tau_equals_the_closed_form():
    """Guards Kendall's tau between a metric's order and the Bradley-Terry order: 4 systems, one
    discordant pair of 6 -> (5 - 1) / 6; a lower-is-better metric is read the other way."""
    strengths = {"a": 1.0, "b": 0.5, "c": -0.5, "d": -1.0}
    metric = {"a": 4.0, "b": 2.0, "c": 3.0, "d": 1.0}
    tau, _ = ranking_tau(metric, strengths)
    assert tau == pytest.approx(4 / 6)
    assert ranking_tau({k: -v for k, v in metric.items()}, strengths, higher_is_better=False)[0] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="at least two systems"):
        ranking_tau({"a": 1.0}, strengths)


def test_the_leaderboard_names_a_pick_by_only_for_a_metric_clearly_better_than_chance():
    """Guards advising `--pick-by` for a metric whose agreement with the raters could be chance (its 95%
    interval reaching 50%), or naming one that agrees less than another."""
    from slapgen.evaluation.leaderboard import metric_sentence, tracking_metric

    def metric(rate, low, high, tau):
        return {"agreement": {"rate": rate, "low": low, "high": high, "compared": 40, "prompts": 10}, "kendall_tau": tau}

    clear = {"fvd_i3d": metric(0.60, 0.52, 0.70, 0.2), "clip_score_vitl14": metric(0.80, 0.70, 0.90, 0.8)}
    assert tracking_metric(clear) == "clip_score_vitl14"
    assert metric_sentence(clear).endswith("--pick-by clip_score_vitl14.")
    unclear = {"clip_score_vitl14": metric(0.62, 0.45, 0.80, 0.4)}
    assert tracking_metric(unclear) is None and "--pick-by" not in metric_sentence(unclear)
    assert tracking_metric({"x": {"agreement": {"rate": None}, "kendall_tau": None}}) is None


def test_on_fewer_prompts_than_separation_needs_no_metric_is_called_for_or_against_the_raters():
    """Guards a leaderboard that read "Clearly against the raters: subject_consistency_dino ... in 67% of 12 verdicts
    (95% interval 67% to 67%) ... do not pick by it" from a campaign of 2 prompts (a walk-through's find): over so few
    prompts the bootstrap interval collapses. Below MIN_SEPARATION_PROMPTS (the stopping rule's minimum) the summary
    says so, names the most agreeing metric so far, and advises no --pick-by; from that many on, it judges as before."""
    from slapgen.evaluation.leaderboard import metric_sentence, tracking_metric
    from slapgen.evaluation.ranking import MIN_SEPARATION_PROMPTS

    def board(prompts):
        agreement = {"compared": 12, "prompts": prompts}
        return {"clip_score_tiny": {"agreement": {**agreement, "rate": 0.9, "low": 0.8, "high": 1.0}, "kendall_tau": 1.0},
                "subject_consistency_dino": {"agreement": {**agreement, "rate": 1 / 3, "low": 1 / 3, "high": 1 / 3},
                                             "kendall_tau": None}}

    few = board(MIN_SEPARATION_PROMPTS - 1)
    assert metric_sentence(board(2)) == (
        "Too few prompts to tell which automatic metric tracks the raters: verdicts on 2 prompts, and calling a metric "
        f"for or against them needs at least {MIN_SEPARATION_PROMPTS}; so far clip_score_tiny agrees with them most "
        "(90% of 12 verdicts).")
    assert tracking_metric(few) is None and "Clearly against" not in metric_sentence(few)
    enough = board(MIN_SEPARATION_PROMPTS)
    assert tracking_metric(enough) == "clip_score_tiny"
    assert "Clearly against the raters: subject_consistency_dino" in metric_sentence(enough)


def test_the_metric_summary_says_a_metric_clearly_against_the_raters():
    """Guards the summary naming only the most agreeing metric: on the tiny walk-through raters who liked
    motion disagreed with temporal_flickering in all 48 verdicts (interval 0% to 0%), a clear signal, and
    the sentence said only that heldout_loss agreed 54% (not clearly better than chance). A metric whose
    interval lies below 50% is now named with its share of contrary verdicts (1 - rate); one whose interval
    reaches 50% is not, and `--pick-by` advice stays last."""
    from slapgen.evaluation.leaderboard import metric_sentence

    def metric(rate, low, high, compared=48):
        return {"agreement": {"rate": rate, "low": low, "high": high, "compared": compared, "prompts": 12},
                "kendall_tau": None}

    board = {"heldout_loss": metric(0.54, 0.38, 0.71), "temporal_flickering": metric(0.0, 0.0, 0.0),
             "subject_consistency_dino": metric(0.25, 0.125, 0.375, 40), "fvd_i3d": metric(0.46, 0.25, 0.67)}
    sentence = metric_sentence(board)
    assert sentence.startswith("heldout_loss agrees with the raters most, but not clearly better than chance")
    assert sentence.endswith(
        ". Clearly against the raters: temporal_flickering prefers the video they did not in 100% of 48 verdicts "
        "(95% interval 100% to 100%); subject_consistency_dino prefers the video they did not in 75% of 40 "
        "verdicts (95% interval 62% to 88%); the raters prefer what these metrics penalise, so do not pick by them.")
    assert "fvd_i3d" not in sentence
    clear = {"clip_score_vitl14": metric(0.80, 0.70, 0.90), "temporal_flickering": metric(0.1, 0.0, 0.2)}
    assert ("temporal_flickering prefers the video they did not in 90% of 48 verdicts (95% interval 80% to 100%); "
            "the raters prefer what it penalises, so do not pick by it." in metric_sentence(clear))
    assert metric_sentence(clear).endswith("--pick-by clip_score_vitl14.")
    assert "against" not in metric_sentence({"heldout_loss": metric(0.54, 0.38, 0.71)})
    # Every metric against the raters: no "agrees with the raters most" before "clearly against" (review).
    against = {"temporal_flickering": metric(0.0, 0.0, 0.0), "fvd_i3d": metric(0.2, 0.1, 0.3)}
    assert metric_sentence(against) == (
        "No automatic metric agrees with the raters. Clearly against the raters: temporal_flickering prefers the "
        "video they did not in 100% of 48 verdicts (95% interval 100% to 100%); fvd_i3d prefers the video they did "
        "not in 80% of 48 verdicts (95% interval 70% to 90%); the raters prefer what these metrics penalise, so do "
        "not pick by them.")


def test_a_campaign_with_fewer_prompts_than_separation_needs_says_only_its_budget_ends_it():
    """Guards the leaderboard of a campaign made from 4 prompts reading "separating the top system from the second
    needs at least 5" (a walk-through's find): read as "rate more", though no fifth prompt exists, so only the budget
    can end it. Given the campaign's prompts and items, the sentence says so, also of a campaign of 5 prompts but
    fewer prompt/seed items than the direct comparisons need (8); without them (or with enough) it is as before."""
    from slapgen.evaluation.leaderboard import criterion_board
    from slapgen.evaluation.ranking import MIN_SEPARATION_PROMPTS, separation_items_needed

    verdicts = [Verdict("a", "b", LEFT, f"p{k}", 0, "ana") for k in range(3)]

    def why(campaign_prompts, campaign_items=None, budget=10):
        return criterion_board(verdicts, [], ["a", "b"], budget, {}, {}, {}, resamples=50,
                               campaign_prompts=campaign_prompts, campaign_items=campaign_items)["why"]

    before = ("not yet: verdicts on 3 prompts, and separating the top system from the second needs at least "
              f"{MIN_SEPARATION_PROMPTS}; 7 ratings left in the budget")
    assert separation_items_needed() == 8
    assert why(None) == before and why(MIN_SEPARATION_PROMPTS, 8) == before
    assert why(MIN_SEPARATION_PROMPTS - 1) == (
        f"not yet, and only the budget can end it: the campaign has {MIN_SEPARATION_PROMPTS - 1} prompts, and "
        f"separation needs verdicts on at least {MIN_SEPARATION_PROMPTS}; 7 ratings left in the budget")
    assert why(MIN_SEPARATION_PROMPTS, 7) == (
        "not yet, and only the budget can end it: the campaign has 7 prompt/seed items, and separation needs the top "
        "system to beat the second on at least 8 of them; 7 ratings left in the budget")
    assert why(MIN_SEPARATION_PROMPTS - 1, budget=None).startswith("not yet, and without a budget it cannot end: ")


def test_the_leaderboard_lists_the_consistency_of_raters_who_answered_a_repeat():
    """Guards a leaderboard that lists every rater under `rater_consistency`, those with no repeat as a row of nulls
    (372 KB at a soak's 2,179 raters, most never shown a repeat): r1 answered a repeat (consistent), r2 none."""
    from slapgen.evaluation.leaderboard import criterion_board

    verdicts = [Verdict("a", "b", LEFT, f"p{k}", 0, "r1") for k in range(3)] + [Verdict("a", "b", RIGHT, "p0", 0, "r2")]
    repeats = [Verdict("b", "a", RIGHT, "p1", 0, "r1")]
    board = criterion_board(verdicts, repeats, ["a", "b"], None, {}, {}, {}, resamples=20)
    assert board["rater_consistency"] == {"r1": {"rater": "r1", "repeats": 1, "consistent": 1, "rate": 1.0}}
