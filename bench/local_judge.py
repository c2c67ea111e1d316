"""The embedded local judge (judge/default.yaml without a key: a vLLM server on 127.0.0.1 serving the tiny model)
judging the project's anchors on the exact path, at several farm concurrencies, side by side in one run: each
concurrency with its own server and its own empty judge cache. What the demo's EM phase pays per answer.

Prints one JSON object. `python bench/local_judge.py [--items 24] [--concurrency 16 64]`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    args = ap.parse_args()
    os.environ.pop("OPENAI_API_KEY", None)  # the default config then picks the embedded server

    from judge.anchors import anchor_items, load_project_anchors
    from judge.config import load_config
    from judge.scorers import EMScorer
    from judge.session import session
    from run.layout import Layout

    items = anchor_items(load_project_anchors())[: args.items]
    cfg = load_config(None)
    out: dict = {"items": len(items), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for conc in args.concurrency:
            c = cfg.model_copy(update={"concurrency": conc, "cache_path": str(Path(tmp) / f"cache-{conc}.sqlite"),
                                       "endpoints": [e.model_copy(update={"max_concurrent": conc}) if e.local else e
                                                     for e in cfg.endpoints]})
            with session(c, layout=Layout(tmp), run=f"bench-{conc}", progress=False) as s:
                t0 = time.perf_counter()
                s.endpoints()  # the server starts
                start = time.perf_counter() - t0
                t0 = time.perf_counter()
                _, summary = s.judge(items, EMScorer(), purpose="bench", phase="bench")
                wall = time.perf_counter() - t0
            out[f"concurrency_{conc}"] = {"server_start_s": round(start, 1), "wall_s": round(wall, 1),
                                          "requests": summary.requests_sent,
                                          "requests_per_s": round(summary.requests_sent / wall, 2),
                                          "items_per_s": round(len(items) / wall, 3), "ok": summary.ok,
                                          "path": summary.path}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
