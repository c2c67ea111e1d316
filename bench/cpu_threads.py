"""vLLM's CPU settings, side by side: the offline engine's generation and the local judge's reading.

Each setting runs in a fresh process (vLLM reads them when its engine core starts): vLLM's default of one core
reserved for its scheduler, none reserved (what engine.vllm_engine.cpu_env sets on few cores), and none reserved
with libiomp5 preloaded (vLLM's CPU guide asks for it, and for tcmalloc, which no package registry here has).
The judge server runs each with vLLM's default KV block of 128 tokens, and none reserved again with the
project's 32 (judge.local_server.CPU_BLOCK_SIZE). Prints one JSON object; ratios are against vLLM's defaults,
measured in this run.

.venv/bin/python bench/cpu_threads.py [--chats 48] [--judgments 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IOMP = ROOT / ".venv" / "lib" / "libiomp5.so"
SETTINGS = {
    "reserve_1": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},
    "reserve_0": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    "reserve_0_iomp": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "LD_PRELOAD": str(IOMP)},
}
BLOCK_ENV = "BENCH_JUDGE_BLOCK_SIZE"  # the judge server's KV block size in a child (vLLM's CPU default: 128)


def generation(chats: int) -> dict:
    from cai_bootstrap.engine.factory import make_engine
    from cai_bootstrap.engine.types import Request, Sampling

    engine = make_engine("vllm", "tiny")
    t0 = time.perf_counter()
    engine.llm  # noqa: B018 (starts the engine)
    out = {"start_s": round(time.perf_counter() - t0, 1)}
    prompts = [Request.chat(f"Write a short story about robot number {i} learning to paint.") for i in range(chats)]
    for max_tokens in (96, 8):  # decode-heavy, then prefill-heavy
        t0 = time.perf_counter()
        done = engine.generate(prompts, Sampling(max_tokens=max_tokens))
        seconds = time.perf_counter() - t0
        out[f"max_tokens_{max_tokens}"] = {"seconds": round(seconds, 2),
                                           "tokens_per_s": round(sum(c.completion_tokens for c in done) / seconds, 1)}
    return out


def judging(n: int) -> dict:
    from cai_bootstrap.judge import local_server
    from cai_bootstrap.judge.anchors import anchor_items, load_project_anchors
    from cai_bootstrap.judge.config import load_config
    from cai_bootstrap.judge.scorers import EMScorer
    from cai_bootstrap.judge.session import session
    from cai_bootstrap.run.layout import Layout

    local_server.CPU_BLOCK_SIZE = int(os.environ.get(BLOCK_ENV, "128"))
    tmp = Path(tempfile.mkdtemp())
    cfg = load_config(None).model_copy(update={"cache_path": tmp / "cache.sqlite"})
    items = anchor_items(load_project_anchors())[:n]
    with session(cfg, layout=Layout(tmp), run="bench", progress=False) as js:
        t0 = time.perf_counter()
        js.endpoints()
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, summary = js.judge(items, EMScorer(), purpose="bench")
        seconds = time.perf_counter() - t0
    s = summary.as_dict()
    return {"block_size": local_server.CPU_BLOCK_SIZE, "start_s": round(start, 1), "items": n,
            "requests": s["requests_sent"], "seconds": round(seconds, 1),
            "requests_per_s": round(s["requests_sent"] / seconds, 2)}


def child(what: str, n: int) -> None:
    print("RESULT " + json.dumps(generation(n) if what == "generation" else judging(n)), flush=True)


def run(what: str, n: int, env: dict[str, str]) -> dict:
    full = os.environ | env
    if "LD_PRELOAD" in env and not IOMP.is_file():
        return {"skipped": f"{IOMP} not found"}
    p = subprocess.run([sys.executable, __file__, "--child", what, "--n", str(n)], env=full, capture_output=True,
                       text=True, timeout=1200)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": p.stderr[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=48)
    ap.add_argument("--judgments", type=int, default=20, help="anchor answers, each judged on two metrics")
    ap.add_argument("--child")
    ap.add_argument("--n", type=int)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.n)
    out: dict = {"cpus": os.cpu_count(), "generation": {}, "judging": {}}
    for name, env in SETTINGS.items():
        out["generation"][name] = run("generation", a.chats, env)
        out["judging"][name] = run("judging", a.judgments, env)
    block_32 = SETTINGS["reserve_0"] | {BLOCK_ENV: "32"}
    out["judging"]["reserve_0_block_32"] = run("judging", a.judgments, block_32)
    base_gen, base_judge = out["generation"]["reserve_1"], out["judging"]["reserve_1"]
    ratios = {
        name: {
            "generation_96_tokens": round(base_gen["max_tokens_96"]["seconds"] / g["max_tokens_96"]["seconds"], 2),
            "generation_8_tokens": round(base_gen["max_tokens_8"]["seconds"] / g["max_tokens_8"]["seconds"], 2),
            "judging": round(base_judge["seconds"] / j["seconds"], 2),
        }
        for name in SETTINGS
        if "seconds" in (j := out["judging"][name]) and "max_tokens_96" in (g := out["generation"][name])
    }
    if "seconds" in (b := out["judging"]["reserve_0_block_32"]):
        ratios["reserve_0_block_32"] = {"judging": round(base_judge["seconds"] / b["seconds"], 2)}
    out["ratio_vs_vllm_defaults"] = ratios
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
