"""How many ratings a rating campaign needs before it may stop as "separated", by how strongly raters prefer the
best system to the second; and how often it calls a winner that is not the best.

Simulated campaigns, no model and no server, through the service's own code: raters ask in turn for the pair that
`slapgen.evaluation.ranking.next_pair` chooses, verdicts are drawn from Davidson's Bradley-Terry model with ties
(nu = `--tie`), and after every rating the campaign asks whether it is separated (`ranking.separated`: the
leaderboard's `stopping(rank_systems(...))`, and the question a campaign asks before it issues each pair).

Systems: the best, the second, and `--systems` - 2 more, each `--rest-gap` below the one above (log-strength). A
case is the preference: the share of the best's wins among the untied verdicts between the best and the second,
`p`; their log-strengths differ by logit(p). Case 0.5 is two equal systems: any "separated" there is a false
winner (the rule promises at most 5%, however often it is checked).

Per case: the share of campaigns separated within `--max-ratings`, the median and 90th percentile of the ratings
and of the items (prompt, seed) judged by the best two before that, and the share whose separated winner is not
the best. The direct comparisons count one verdict per item, so a campaign of too few items cannot separate a
small preference whatever its budget: `--prompts` x `--seeds` items bound it.

    python bench/separation.py [--runs 40] [--preferences 0.5,0.6,0.7,0.8,0.9] [--max-ratings 1200] [--save]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    add_save_argument, device_description, options_of, print_table, run_case_in_subprocess, write_results,
)


def simulate_campaign(preference: float, run: int, args) -> dict:
    """One campaign: whether and when it separated, and whom it named."""
    from slapgen.evaluation.ranking import OUTCOMES, Verdict, next_pair, rank_systems, separated, stopping

    systems = [f"s{k}" for k in range(args.systems)]
    gap = math.log(preference / (1 - preference))
    truth = dict(zip(systems, [gap] + [-args.rest_gap * k for k in range(args.systems - 1)]))
    items = [(f"p{p}", s) for p in range(args.prompts) for s in range(args.seeds)]
    raters = [f"r{k}" for k in range(args.raters)]
    chooser, nature = np.random.default_rng([run, 0]), np.random.default_rng([run, 1])
    verdicts: list = []
    for step in range(args.max_ratings):
        rater = raters[step % len(raters)]
        pair = next_pair(verdicts, systems, items, rater, chooser)
        if pair is None:
            break
        left, right = truth[pair.left], truth[pair.right]
        weights = np.array([np.exp(left), np.exp(right), args.tie * np.exp((left + right) / 2)])
        outcome = OUTCOMES[nature.choice(3, p=weights / weights.sum())]
        verdicts.append(Verdict(pair.left, pair.right, outcome, pair.prompt, pair.seed, rater))
        if not separated(verdicts, systems):  # the campaign's own question before each pair
            continue
        ranking = rank_systems(verdicts, systems)
        if stopping(ranking).reason == "separated":
            duel = ranking.head_to_head
            return {"separated": True, "ratings": step + 1, "items": duel.wins + duel.losses + duel.ties,
                    "winner_is_best": ranking.standings[0].system == "s0"}
    return {"separated": False, "ratings": len(verdicts), "items": None, "winner_is_best": None}


def run_case(case: str, args) -> dict:
    started = time.perf_counter()
    preference = float(case)
    campaigns = [simulate_campaign(preference, run, args) for run in range(args.runs)]
    separated = [c for c in campaigns if c["separated"]]
    ratings = np.array([c["ratings"] for c in separated], dtype=float)
    items = np.array([c["items"] for c in separated], dtype=float)

    def quantile(values: np.ndarray, q: float):
        return int(np.quantile(values, q)) if len(values) else None

    return {
        "preference": preference, "runs": args.runs, "separated_share": round(len(separated) / args.runs, 4),
        "median_ratings": quantile(ratings, 0.5), "p90_ratings": quantile(ratings, 0.9),
        "median_items_top_two": quantile(items, 0.5), "p90_items_top_two": quantile(items, 0.9),
        # Over all runs: a campaign that names the wrong winner is the harm, whatever the others did.
        "wrong_winner_share": round(sum(not c["winner_is_best"] for c in separated) / args.runs, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="run one preference (in this process)")
    parser.add_argument("--preferences", default="0.5,0.6,0.7,0.8,0.9",
                        help="the best's share of untied verdicts against the second, one case each")
    parser.add_argument("--runs", type=int, default=40, help="simulated campaigns per case")
    parser.add_argument("--systems", type=int, default=4)
    parser.add_argument("--rest-gap", type=float, default=1.0,
                        help="log-strength between the second and the third, and each next")
    parser.add_argument("--tie", type=float, default=0.5, help="Davidson's tie parameter nu of the simulation")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--raters", type=int, default=4)
    parser.add_argument("--max-ratings", type=int, default=1200)
    add_save_argument(parser)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    forwarded = options_of(args, ("runs", "systems", "rest-gap", "tie", "prompts", "seeds", "raters", "max-ratings"))
    cases = [case.strip() for case in args.preferences.split(",")]
    rows = [run_case_in_subprocess(Path(__file__), case, forwarded) for case in cases]
    print(f"{args.systems} systems (the rest {args.rest_gap} apart in log-strength), ties nu={args.tie}, "
          f"{args.prompts} prompts x {args.seeds} seeds = {args.prompts * args.seeds} items, {args.raters} raters, "
          f"{args.runs} campaigns per preference, at most {args.max_ratings} ratings each")
    print_table(rows, ["preference", "runs", "separated_share", "median_ratings", "p90_ratings",
                       "median_items_top_two", "p90_items_top_two", "wrong_winner_share", "seconds"])
    path = write_results("separation", {"device": device_description(), "cores": os.cpu_count(),
                                        "settings": {k: v for k, v in vars(args).items() if k not in ("case", "save")},
                                        "results": rows}, save=args.save)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
