"""Benchmark of the per-stage evaluation on the tiny profile: wall time and $ per stage, and the share of
the time spent waiting on the judge vs generating answers (plus guard and lm-eval), then the cached rerun.

The judge is the project's fault-injecting OpenAI-compatible server on 127.0.0.1 with API-like latency
(50-250 ms) and gpt-4o prices in the config, standing in for a paid API. Stage adapters are random-B
LoRA stand-ins (stages 1, 2). Prints one JSON object.

    .venv/bin/python bench/eval.py [--n-general 8 --n-kind 2 --n-safety 4 --mc-limit 20 --max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-general", type=int, default=8)
    ap.add_argument("--n-kind", type=int, default=2)
    ap.add_argument("--n-safety", type=int, default=4)
    ap.add_argument("--mc-limit", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()

    import os

    from cai_bootstrap.engine.hf_engine import HFEngine
    from cai_bootstrap.engine.models import resolve_model
    from cai_bootstrap.evals.run import EvalOptions, evaluate
    from cai_bootstrap.run.config import RunConfig, save_config
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the suite's fault server and fixtures: tests/
    from tests.fault_server import Faults
    from tests.test_evals_e2e import _ab_server, _adapter

    tiny = resolve_model("tiny")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        for k in (1, 2):
            _adapter(tiny, tmp / "checkpoints" / "hhh" / f"stage{k}", seed=k)
        cfg = RunConfig(personas=["hhh"], profile="tiny", engine="hf", data_root=str(tmp / "data"),
                        ckpt_root=str(tmp / "checkpoints"))
        save_config(cfg, "bench")
        os.environ["BENCH_EVAL_JUDGE_KEY"] = "test-key-evals"
        srv = _ab_server()
        srv.fa.faults = Faults(api_key="test-key-evals", latency=(0.05, 0.25))
        with srv, HFEngine("tiny") as eng:
            jc = tmp / "judge.yaml"
            jc.write_text(json.dumps({"model": "gpt-4o-standin", "endpoints": [{
                "name": "fault", "base_url": srv.url, "api_key_env": "BENCH_EVAL_JUDGE_KEY", "rpm": 3000,
                "max_concurrent": 16, "usd_per_m_in": 2.5, "usd_per_m_out": 10.0}]}))
            opts = EvalOptions(stages=[0, 1, 2], n_general=a.n_general, n_kind=a.n_kind, n_safety=a.n_safety,
                               mc_limit=a.mc_limit, max_tokens=a.max_tokens, guard="tiny")
            t0 = time.perf_counter()
            s = evaluate("hhh", "bench", cfg, opts, judge_config=jc, engine=eng, log=lambda m: None,
                         progress=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            s2 = evaluate("hhh", "bench", cfg, opts, judge_config=jc, engine=eng, log=lambda m: None,
                          progress=False)
            rerun = time.perf_counter() - t0
    per_stage = {}
    tot = {"generate": 0.0, "judge_wait": 0.0, "guard": 0.0, "lm_eval": 0.0}
    for k, r in s["per_stage"].items():
        c = r["cost"]
        parts = {"generate": c["wall_seconds"], "judge_wait": c["judge_wall_seconds"],
                 "guard": c["guard_seconds"], "lm_eval": c["lm_eval_seconds"]}
        for p, v in parts.items():
            tot[p] += v
        per_stage[k] = {"wall_s": round(sum(parts.values()), 2), **{f"{p}_s": round(v, 2) for p, v in parts.items()},
                        "usd": round(c["usd"], 6), "judge_usd": round(c["judge_usd"], 6),
                        "judge_requests": c["judge_requests"], "answers_generated": c["generated"]}
    accounted = sum(tot.values())
    print(json.dumps({
        "profile": "tiny", "engine": "hf", "judge": "fault server 127.0.0.1, 50-250 ms latency, gpt-4o prices",
        "counts": vars(a), "stages": s["stages"],
        "first_run_wall_s": round(first, 2), "per_stage": per_stage,
        "share": {p: round(v / accounted, 3) for p, v in tot.items()},
        "judge_wait_vs_generate": round(tot["judge_wait"] / max(tot["generate"], 1e-9), 4),
        "total_usd": round(sum(r["cost"]["usd"] for r in s["per_stage"].values()), 6),
        "judge_requests_sent": s["judge_requests_sent"],
        "rerun_wall_s": round(rerun, 2),
        "rerun_calls": {k: s2[k] for k in ("engine_calls", "judge_requests_sent", "guard_calls", "lm_eval_runs")},
    }, indent=1))


if __name__ == "__main__":
    main()
