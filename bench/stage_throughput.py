"""One stage's generation throughput through the pipeline (cache, bookkeeping) vs the raw engine on the
same prompts. Runs the stage-6 respond step on N tasks via `steps.respond` (cold cache), then sends the
identical requests straight to `engine.generate`. Prints JSON with both tokens/s and their ratio (≥ 0.9).
Usage: python bench/stage_throughput.py [--tasks 64] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    from cai_bootstrap.constitution import load_constitution
    from cai_bootstrap.engine.cache import GenerationCache
    from cai_bootstrap.engine.types import Sampling
    from cai_bootstrap.engine.vllm_engine import VLLMEngine
    from cai_bootstrap.stages import steps
    from cai_bootstrap.stages.specs import get_stage

    spec = get_stage(6)
    tasks = [f"{spec.seeds[i % len(spec.seeds)]} (case {i})" for i in range(args.tasks)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-tp-"))
    with VLLMEngine("tiny") as eng, GenerationCache(tmp / "cache.sqlite") as cache:
        ctx = steps.Ctx(engine=eng, cache=cache, constitution=load_constitution("hhh"), spec=spec,
                        max_tokens=args.max_tokens)
        warm = [steps.new_item(6, "Say hello.", "seed")]
        steps.respond(ctx, warm)  # the first vLLM call pays warm-up; not part of either figure
        items = [steps.new_item(6, t, "seed") for t in tasks]
        t = time.perf_counter()
        steps.respond(ctx, items)
        pipe_s = time.perf_counter() - t
        pipe_tokens = eng.usage[-1].tokens_out
        reqs = [steps._respond_request(ctx, t) for t in tasks]
        sampling = Sampling(temperature=0.0, top_p=0.95, max_tokens=args.max_tokens, seed=0,
                            stop=steps.RUNAWAY_STOPS)
        t = time.perf_counter()
        out = eng.generate(reqs, sampling)
        raw_s = time.perf_counter() - t
        raw_tokens = sum(c.completion_tokens for c in out)
    pipe_tps, raw_tps = pipe_tokens / pipe_s, raw_tokens / raw_s
    print(json.dumps({"tasks": args.tasks, "max_tokens": args.max_tokens,
                      "pipeline_tokens": pipe_tokens, "pipeline_s": round(pipe_s, 3),
                      "pipeline_tok_s": round(pipe_tps, 1), "raw_tokens": raw_tokens, "raw_s": round(raw_s, 3),
                      "raw_tok_s": round(raw_tps, 1), "ratio": round(pipe_tps / raw_tps, 3)}))


if __name__ == "__main__":
    main()
