"""What one-model-at-a-time costs and frees: `--stage 1` on the tiny profile, models kept up (the CPU default)
beside `--one-resident` (the CUDA default, forced here), each from an empty directory.

Prints one JSON object: per variant the wall time, the peak RSS of the run's whole process tree (sampled every
0.2 s), the vLLM starts, and (forced variant) each release with the tree's RSS and processes before and after
it, from the run's residency.json; then the ratios. `python bench/residency.py [--n-tasks 3]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cai_bootstrap.engine.residency import tree_rss

ROOT = Path(__file__).resolve().parents[1]

def run_variant(extra: list[str], counts: dict) -> dict:
    cwd = Path(tempfile.mkdtemp(prefix="bench-residency-"))
    cmd = [sys.executable, str(ROOT / "bootstrap.py"), "--persona", "goodness", "--stage", "1", "--counts",
           json.dumps(counts), *extra]
    env = {**os.environ, "COLUMNS": "200"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0, "processes": 0}

    def sample() -> None:
        while proc.poll() is None:
            try:
                rss, n = tree_rss(proc.pid)
                peak["rss"], peak["processes"] = max(peak["rss"], rss), max(peak["processes"], n)
            except Exception:  # the process exited between poll and read
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    residency = json.loads((next((cwd / "data" / "runs").iterdir()) / "residency.json").read_text())
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak["rss"] / 2**20),
            "peak_processes": peak["processes"], "vllm_starts": residency["vllm_engine_starts"],
            "releases": residency["releases"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-tasks", type=int, default=3)
    a = ap.parse_args()
    counts = {"n_tasks": a.n_tasks, "n_samples": 3, "rounds": 1, "max_tokens": 64, "dpo_max_steps": 1,
              "min_gap": 0.05}
    res: dict = {"counts": counts, "cpus": os.cpu_count()}
    for name, extra in (("kept_up", []), ("one_resident", ["--one-resident"])):
        res[name] = run_variant(extra, counts)
        print(json.dumps({name: res[name]}), file=sys.stderr, flush=True)
    kept, one = res["kept_up"], res["one_resident"]
    policy = [x for x in one["releases"] if x["released"] == "policy"]
    res["ratios"] = {
        "wall_one_resident_over_kept_up": round(one["wall_s"] / kept["wall_s"], 2),
        "peak_rss_one_resident_over_kept_up": round(one["peak_rss_mb"] / kept["peak_rss_mb"], 2),
    }
    res["policy_release_freed_mb"] = [x["rss_before_mb"] - x["rss_after_mb"] for x in policy]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
