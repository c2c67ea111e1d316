"""Guard scoring throughput: batched (one forward per batch) vs one item per call, tiny stand-in on CPU.

Prints one JSON object. `python bench/guard_throughput.py [--n 8] [--batch 8] [--profile tiny]`.
The threshold is set high so only the P(unsafe) pass runs (category generation is measured apart, on a
few items forced through it with a threshold near 0).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gen-items", type=int, default=2)
    ap.add_argument("--profile", default="tiny")
    args = ap.parse_args()

    import torch

    from cai_bootstrap.guard.llama_guard import LlamaGuard

    prompts = [f"Question {i}: how do I {'cook rice' if i % 2 else 'fix a flat bicycle tire'} well?"
               for i in range(args.n)]
    t0 = time.perf_counter()
    g = LlamaGuard(args.profile, threshold=0.999, batch_size=args.batch)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    batched = g.check_prompts(prompts)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    singles = [g.check_prompts([p])[0] for p in prompts]
    single_s = time.perf_counter() - t0
    max_diff = max(abs(a.p_unsafe - b.p_unsafe) for a, b in zip(batched, singles, strict=True))

    g.threshold = 1e-6  # every item flagged: scoring + category generation
    t0 = time.perf_counter()
    g.check_prompts(prompts[: args.gen_items])
    gen_s = time.perf_counter() - t0
    print(json.dumps({
        "profile": args.profile, "guard": g.name, "device": g.device, "threads": torch.get_num_threads(),
        "items": args.n, "batch_size": args.batch, "load_s": round(load_s, 2),
        "batched_items_per_s": round(args.n / batched_s, 3),
        "single_items_per_s": round(args.n / single_s, 3),
        "speedup": round(single_s / batched_s, 2), "max_p_unsafe_diff_batched_vs_single": max_diff,
        "flagged_items_with_categories_per_s": round(args.gen_items / gen_s, 3),
    }))


if __name__ == "__main__":
    main()
