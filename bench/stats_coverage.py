"""Coverage of the true EM-rate difference by the naive (iid answers) bootstrap and by the project's interval
(analysis/inference.paired_diff: a seeds x questions cluster bootstrap, percentile; its expanded variant beside
it), over simulated experiments whose questions are drawn from a question population.

Prints one JSON object: coverage and mean width per method, the true difference and the parameters.

    .venv/bin/python bench/stats_coverage.py [--sims 200 --seed 0 --n-boot 2000 --questions 8 --seeds 3]
"""

from __future__ import annotations

import argparse
import json
import time

from cai_bootstrap.analysis.inference import SimParams, coverage_study


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=2000)
    d = SimParams()
    ap.add_argument("--questions", type=int, default=d.n_questions)
    ap.add_argument("--samples", type=int, default=d.n_samples, help="answers per (seed, question)")
    ap.add_argument("--seeds", type=int, default=d.n_seeds, help="EM-training seeds per arm")
    ap.add_argument("--seed-sd", type=float, default=d.seed_sd, help="seed offset sd on the logit scale")
    ap.add_argument("--logit-shift", type=float, default=d.logit_shift)
    a = ap.parse_args()
    params = SimParams(n_questions=a.questions, n_samples=a.samples, n_seeds=a.seeds, seed_sd=a.seed_sd,
                       logit_shift=a.logit_shift)
    t0 = time.perf_counter()
    r = coverage_study(params, sims=a.sims, seed=a.seed, n_boot=a.n_boot)
    print(json.dumps({
        "nominal": 0.95,
        "coverage": {m: round(c, 3) for m, c in r["coverage"].items()},
        "mean_width": {m: round(w, 4) for m, w in r["mean_width"].items()},
        "true_difference": round(float(r["truth"]), 4),
        "sims": a.sims, "seed": a.seed, "n_boot": a.n_boot,
        "params": params.model_dump(),
        "seconds": round(time.perf_counter() - t0, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
