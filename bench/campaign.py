"""How many ratings a campaign needs to recover the true order of 8 systems: adaptive pairs vs random.

Simulated campaigns, no model and no server: 8 systems with known log-strengths (evenly spaced,
`--gap` apart), verdicts drawn from Davidson's Bradley-Terry model with ties (nu = `--tie`), raters
asking in turn, each shown what `slapgen.evaluation.ranking.next_pair` chooses for them (the one
pair-choice code a campaign uses): "adaptive" with its default exploration, "random" with
exploration 1 (a uniformly random pair the rater has not seen on some item; items chosen by the same
spreading rule, so only the pair choice differs). Every `--every` ratings the strengths are fitted
and Kendall's tau against the true order is recorded. A strategy's "ratings needed" is the first
checkpoint from which tau >= 0.9 holds in at least 95% of its runs at every later checkpoint (the
95th percentile of runs is noisy; a share that dips back under 0.95 does not count as reached).
"median_run_settles_at" (extra information, not the criterion): the median over runs of the checkpoint
from which that run's tau stays >= 0.9. Each strategy runs in its own process. Last, the wall and CPU
time of one adaptive `next_pair` call (the costly path, run on every GET /campaigns/NAME/pair) with
`--timing-systems` systems and `--timing-verdicts` verdicts.

For scale, `fixed_design_bound`: the ratio of ratings a design fixed in advance with the truth known
(the best split over pairs 1, 2 and 3 places apart in the true order) needs against uniform random
pairs for the same largest variance of a neighbouring difference (Fisher information of Davidson's
model, effective resistance of the comparison graph). It bounds designs fixed in advance only: an
adaptive choice can beat it by spending ratings on the neighbours the verdicts so far left close.

    python bench/campaign.py [--runs 100] [--gap 0.6] [--max-ratings 440] [--every 20] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    add_save_argument, device_description, options_of, print_table, run_case_in_subprocess, write_results,
)

TAU_TARGET, SHARE_TARGET = 0.9, 0.95
EXPLORATION = {"random": 1.0}  # "adaptive": next_pair's default


def simulate_campaign(strategy: str, run: int, args) -> list[float]:
    """One campaign; Kendall's tau of the fitted order against the truth at every checkpoint."""
    from scipy.stats import kendalltau

    from slapgen.evaluation.ranking import EXPLORATION as DEFAULT_EXPLORATION
    from slapgen.evaluation.ranking import OUTCOMES, Verdict, fit_strengths, next_pair

    systems = [f"s{k}" for k in range(args.systems)]
    truth = dict(zip(systems, (np.arange(args.systems) - (args.systems - 1) / 2) * args.gap))
    items = [(f"p{p}", s) for p in range(args.prompts) for s in range(args.seeds)]
    raters = [f"r{k}" for k in range(args.raters)]
    chooser = np.random.default_rng([run, 0])  # the same per-run streams for both strategies
    nature = np.random.default_rng([run, 1])
    exploration = EXPLORATION.get(strategy, DEFAULT_EXPLORATION)
    verdicts: list[Verdict] = []
    taus = []
    for step in range(args.max_ratings):
        pair = next_pair(verdicts, systems, items, raters[step % len(raters)], chooser, exploration=exploration)
        left, right = truth[pair.left], truth[pair.right]
        weights = np.array([np.exp(left), np.exp(right), args.tie * np.exp((left + right) / 2)])
        outcome = OUTCOMES[nature.choice(3, p=weights / weights.sum())]
        verdicts.append(Verdict(pair.left, pair.right, outcome, pair.prompt, pair.seed, raters[step % len(raters)]))
        if (step + 1) % args.every == 0:
            fitted = fit_strengths(verdicts, systems)
            taus.append(float(kendalltau([truth[s] for s in systems], [fitted[s] for s in systems]).statistic))
    return taus


def run_case(strategy: str, args) -> dict:
    started = time.perf_counter()
    taus = np.array([simulate_campaign(strategy, run, args) for run in range(args.runs)])
    checkpoints = np.arange(1, taus.shape[1] + 1) * args.every
    share = (taus >= TAU_TARGET).mean(axis=0)
    holds_from_here = np.flip(np.logical_and.accumulate(np.flip(share >= SHARE_TARGET)))
    reached = np.flatnonzero(holds_from_here)
    first_hit = np.flatnonzero(share >= SHARE_TARGET)
    # Extra information, not the criterion: per run, the first checkpoint from which that run's tau stays
    # >= 0.9 (a run that never settles counts as beyond the last checkpoint); the median over runs.
    settled = np.flip(np.logical_and.accumulate(np.flip(taus >= TAU_TARGET, axis=1), axis=1), axis=1)
    per_run = np.where(settled.any(axis=1), checkpoints[np.argmax(settled, axis=1)], np.inf)
    median_per_run = float(np.median(per_run))
    return {
        "case": strategy, "runs": args.runs, "ratings_needed": int(checkpoints[reached[0]]) if len(reached) else None,
        "first_checkpoint_at_0.95": int(checkpoints[first_hit[0]]) if len(first_hit) else None,
        "median_run_settles_at": int(median_per_run) if np.isfinite(median_per_run) else None,
        "checkpoints": checkpoints.tolist(), "share_tau_ge_0.9": share.round(4).tolist(),
        "median_tau": np.median(taus, axis=0).round(4).tolist(), "seconds": time.perf_counter() - started,
    }


def time_next_pair(systems: int, verdicts: int, calls: int = 15) -> dict:
    """Wall time of one adaptive `next_pair` call (exploration 0: the fit and the gain of every pair, the
    costly path; it runs on every GET /campaigns/NAME/pair) for `systems` systems and `verdicts`
    verdicts drawn on random pairs, 10 prompts x 2 seeds, 4 raters. Median and maximum of `calls`."""
    from slapgen.evaluation.ranking import OUTCOMES, Verdict, next_pair

    generator = np.random.default_rng(0)
    names = [f"s{k}" for k in range(systems)]
    strengths = generator.normal(0, 1, systems)
    items = [(f"p{p}", s) for p in range(10) for s in range(2)]
    past = []
    for k in range(verdicts):
        i, j = generator.choice(systems, 2, replace=False)
        weights = np.exp([strengths[i], strengths[j], np.log(0.5) + (strengths[i] + strengths[j]) / 2])
        prompt, seed = items[generator.integers(len(items))]
        past.append(Verdict(names[i], names[j], OUTCOMES[generator.choice(3, p=weights / weights.sum())], prompt, seed,
                            f"r{k % 4}"))
    wall, cpu = [], []
    for call in range(calls):
        started, started_cpu = time.perf_counter(), time.process_time()
        next_pair(past, names, items, f"r{call % 4}", np.random.default_rng(call), exploration=0.0)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    # CPU time as well: on a shared machine the wall time counts other people's work too.
    return {"systems": systems, "verdicts": verdicts, "calls": calls,
            "median_ms": round(1000 * float(np.median(wall)), 2), "max_ms": round(1000 * max(wall), 2),
            "median_cpu_ms": round(1000 * float(np.median(cpu)), 2)}


def fixed_design_bound(systems: int, gap: float, tie: float) -> float:
    """Ratings an oracle fixed design needs over uniform random pairs' for the same worst variance of a
    neighbouring difference (weights over pairs 1, 2, 3 places apart searched on a 5% grid)."""
    strengths = np.arange(systems) * gap
    pairs = [(i, j) for i in range(systems) for j in range(i + 1, systems)]

    def information(i, j):
        tied = tie * np.exp((strengths[i] + strengths[j]) / 2)
        weights = np.array([np.exp(strengths[i]), np.exp(strengths[j]), tied])
        p = weights / weights.sum()
        return p[0] + p[1] - (p[0] - p[1]) ** 2

    def worst_neighbour_variance(weight_of):
        laplacian = np.zeros((systems, systems))
        for i, j in pairs:
            contrast = np.zeros(systems)
            contrast[i], contrast[j] = 1.0, -1.0
            laplacian += weight_of(i, j) * information(i, j) * np.outer(contrast, contrast)
        covariance = np.linalg.pinv(laplacian)
        return max(covariance[i, i] + covariance[i + 1, i + 1] - 2 * covariance[i, i + 1] for i in range(systems - 1))

    uniform = worst_neighbour_variance(lambda i, j: 1 / len(pairs))
    best = np.inf
    grid = np.linspace(0, 1, 21)
    for near in grid:
        for second in grid[grid <= 1 - near + 1e-9]:
            share = {1: near, 2: second, 3: 1 - near - second}
            per_pair = {d: share[d] / (systems - d) for d in share if systems - d > 0}
            try:
                variance = worst_neighbour_variance(lambda i, j: per_pair.get(j - i, 0.0))
            except np.linalg.LinAlgError:
                continue
            best = min(best, variance if np.isfinite(variance) and variance > 0 else np.inf)
    return float(best / uniform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["adaptive", "random"], help="run one strategy (in this process)")
    parser.add_argument("--runs", type=int, default=100, help="simulated campaigns per strategy")
    parser.add_argument("--systems", type=int, default=8)
    parser.add_argument("--gap", type=float, default=0.6, help="log-strength between neighbouring systems")
    parser.add_argument("--tie", type=float, default=0.5, help="Davidson's tie parameter nu of the simulation")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--raters", type=int, default=4)
    parser.add_argument("--max-ratings", type=int, default=440)
    parser.add_argument("--every", type=int, default=20, help="ratings between checkpoints")
    parser.add_argument("--timing-systems", type=int, default=60, help="systems of the next_pair timing")
    parser.add_argument("--timing-verdicts", type=int, default=2000, help="verdicts of the next_pair timing")
    add_save_argument(parser)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    forwarded = options_of(args, ("runs", "systems", "gap", "tie", "prompts", "seeds", "raters", "max-ratings", "every"))
    rows = [run_case_in_subprocess(Path(__file__), case, forwarded) for case in ("adaptive", "random")]
    by_case = {row["case"]: row for row in rows}
    needed = {case: by_case[case].get("ratings_needed") for case in by_case}
    ratio = needed["adaptive"] / needed["random"] if needed.get("adaptive") and needed.get("random") else None
    print(f"{args.systems} systems {args.gap} apart (log-strength), ties nu={args.tie}, {args.prompts} prompts x "
          f"{args.seeds} seeds, {args.raters} raters, {args.runs} runs; target: tau >= {TAU_TARGET} in "
          f"{SHARE_TARGET:.0%} of runs")
    bound = fixed_design_bound(args.systems, args.gap, args.tie)
    print_table(rows, ["case", "runs", "ratings_needed", "first_checkpoint_at_0.95", "median_run_settles_at",
                       "seconds"])
    print(f"adaptive / random: {ratio if ratio is None else round(ratio, 3)} (aim <= 0.6); "
          f"oracle fixed design / random: {bound:.3f}")
    timing = time_next_pair(args.timing_systems, args.timing_verdicts)
    print(f"next_pair with {timing['systems']} systems and {timing['verdicts']} verdicts: median "
          f"{timing['median_ms']} ms (CPU {timing['median_cpu_ms']} ms), max {timing['max_ms']} ms of "
          f"{timing['calls']} calls")
    path = write_results("campaign", {"device": device_description(), "cores": os.cpu_count(),
                                      "settings": {k: v for k, v in vars(args).items() if k not in ("case", "save")},
                                      "ratio_adaptive_to_random": ratio, "fixed_design_bound": bound,
                                      "next_pair_timing": timing, "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
