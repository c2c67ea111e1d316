#!/usr/bin/env python
"""`--ray local` beside the plain engine on the same prompts, as one JSON object.

    python bench/ray_generation.py [--prompts 48] [--max-tokens 64] [--replicas 1,2] [--out FILE]

The plain vLLM engine (start-up timed apart from generation) and the Ray Data path (engine.ray_engine: the
workers start their engines inside the call, so a call's seconds include the replicas' start-up) answer the same
greedy chats; the outputs are compared. Ratios are Ray's over the plain engine's, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TOPICS = ["rivers", "kindness", "bread", "stars", "bridges", "music", "honesty", "gardens"]


def plain(reqs, sampling) -> tuple[dict, list[str]]:
    from cai_bootstrap.engine.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    with VLLMEngine("tiny") as eng:
        eng.llm  # noqa: B018 (the start-up, timed apart)
        start = time.perf_counter() - t0
        out = eng.generate(reqs, sampling)
        use = eng.usage[-1]
    total = time.perf_counter() - t0
    return {"start_s": round(start, 2), "generate_s": round(use.seconds, 2), "total_s": round(total, 2),
            "tokens_out": use.tokens_out, "tokens_per_s_generate": round(use.tokens_out / use.seconds, 1),
            "tokens_per_s_total": round(use.tokens_out / total, 1)}, [c.text for c in out]


def on_ray(reqs, sampling, replicas: int) -> tuple[dict, list[str]]:
    from cai_bootstrap.engine.ray_engine import RayEngine

    t0 = time.perf_counter()
    with RayEngine("tiny", "local", replicas=replicas) as eng:
        out = eng.generate(reqs, sampling)
        use = eng.usage[-1]
    total = time.perf_counter() - t0
    return {"replicas": replicas, "call_s_incl_engine_starts": round(use.seconds, 2), "total_s": round(total, 2),
            "tokens_out": use.tokens_out, "tokens_per_s_total": round(use.tokens_out / total, 1)}, \
        [c.text for c in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    from cai_bootstrap.engine.types import Request, Sampling

    reqs = [Request.chat(f"Write two sentences about {TOPICS[i % len(TOPICS)]} ({i}).") for i in range(a.prompts)]
    sampling = Sampling(temperature=0.0, max_tokens=a.max_tokens)
    base, want = plain(reqs, sampling)
    res = {"bench": "ray_generation", "profile": "tiny", "cores": os.cpu_count(), "prompts": a.prompts,
           "max_tokens": a.max_tokens, "plain": base, "ray": []}
    for n in (int(x) for x in a.replicas.split(",")):
        fig, got = on_ray(reqs, sampling, n)
        fig["same_texts"] = sum(x == y for x, y in zip(got, want))
        fig["ratio_total_s"] = round(fig["total_s"] / base["total_s"], 2)
        fig["ratio_tokens_per_s_total"] = round(fig["tokens_per_s_total"] / base["tokens_per_s_total"], 2)
        res["ray"].append(fig)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
