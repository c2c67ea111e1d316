"""The same chats through the vLLM and transformers engines, without and with a LoRA adapter, side by side.

Each variant runs in its own process (vLLM's LoRA ops are chosen per process: `reference` is vLLM-CPU's own
per-token-gather ops, `grouped` is engine/vllm_cpu_lora.py). Two workloads: short chats, and the same chats
behind a long shared context (stage prompts carry few-shot examples and critiques, so prefill matters).
Prints one JSON object with tokens/s per variant and the ratios. `python bench/generation.py [--chats 32]`;
`--ranks 16,32` instead compares vLLM with one rank-8 adapter at each engine max LoRA rank.
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

from cai_bootstrap.engine.types import Request, Sampling

ROOT = Path(__file__).resolve().parents[1]

TOPICS = ["rain", "chess", "bread", "rivers", "trains", "bees", "volcanoes", "libraries"]
ASKS = ["Explain {} to a child.", "Give two facts about {}.", "Write a short poem about {}.",
        "Why do people like {}?", "Describe {} in one paragraph.", "List three questions about {}.",
        "What is surprising about {}?", "Summarise the history of {}."]
CONTEXT = " ".join(f"Principle {i}: answers should be careful, kind, accurate and useful to the reader, "
                   f"and say what they do not know." for i in range(24))  # ~600 tokens


def chats(n: int, long: bool) -> list[Request]:
    asks = [a.format(t) for a in ASKS for t in TOPICS][:n]
    return [Request.chat(a, system=CONTEXT) if long else Request.chat(a) for a in asks]


def make_adapter(out: Path) -> str:
    """Rank 8 on every linear layer, random B, as the tiny profile's DPO adapters are shaped."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cai_bootstrap.engine.models import resolve_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(out)
    return str(out)


def measure(kind: str, adapter: str | None, n: int, max_tokens: int, max_lora_rank: int | None = None) -> dict:
    from cai_bootstrap.engine.factory import make_engine

    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)
    out = {}
    with make_engine(kind, "tiny", **({"max_lora_rank": max_lora_rank} if max_lora_rank else {})) as eng:
        t0 = time.perf_counter()
        eng.generate(chats(2, False), sampling, adapter=adapter)  # start-up and warm-up
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        for long in (False, True):
            t1 = time.perf_counter()
            res = eng.generate(chats(n, long), sampling, adapter=adapter)
            wall = time.perf_counter() - t1
            toks = sum(c.completion_tokens for c in res)
            out["long" if long else "short"] = {"wall_s": round(wall, 2), "tokens": toks,
                                                "tokens_per_s": round(toks / wall, 1)}
    return out


def run_variant(kind: str, adapter: str | None, ops: str, n: int, max_tokens: int, rank: int = 0) -> dict:
    env = {**os.environ, "CAI_VLLM_CPU_LORA": ops}
    cmd = [sys.executable, __file__, "--one", kind, "--adapter", adapter or "", "--chats", str(n),
           "--max-tokens", str(max_tokens), "--max-lora-rank", str(rank)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--one", default=None)
    ap.add_argument("--adapter", default="")
    ap.add_argument("--max-lora-rank", type=int, default=0, help="with --one: the engine's max LoRA rank")
    ap.add_argument("--ranks", default="", help="only vLLM with the rank-8 adapter, at each engine max LoRA rank "
                    "given (e.g. 16,32): what a larger max rank costs")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.adapter or None, a.chats, a.max_tokens, a.max_lora_rank or None)))
        return
    adapter = make_adapter(Path(tempfile.mkdtemp(prefix="bench-adapter-")))
    if a.ranks:
        ranks = [int(r) for r in a.ranks.split(",")]
        res = {"chats": a.chats, "max_tokens": a.max_tokens, "adapter_rank": 8}
        for r in ranks:
            res[f"max_lora_rank_{r}"] = run_variant("vllm", adapter, "grouped", a.chats, a.max_tokens, r)
        lo, hi = (res[f"max_lora_rank_{r}"] for r in (ranks[0], ranks[-1]))
        for w in ("short", "long"):
            res[f"ratio_{w}_rank_{ranks[-1]}_over_{ranks[0]}"] = round(hi[w]["tokens_per_s"] / lo[w]["tokens_per_s"], 2)
        print(json.dumps(res))
        return
    variants = {"vllm": ("vllm", None, "grouped"), "vllm_lora_reference": ("vllm", adapter, "reference"),
                "vllm_lora_grouped": ("vllm", adapter, "grouped"), "hf": ("hf", None, "grouped"),
                "hf_lora": ("hf", adapter, "grouped")}
    res: dict = {"chats": a.chats, "max_tokens": a.max_tokens}
    for name, (kind, ad, ops) in variants.items():
        res[name] = run_variant(kind, ad, ops, a.chats, a.max_tokens)
        print(json.dumps({name: res[name]}), file=sys.stderr, flush=True)

    def tps(v: str, w: str) -> float:
        return res[v][w]["tokens_per_s"]

    for w in ("short", "long"):
        res[f"ratios_{w}"] = {
            "vllm_over_hf": round(tps("vllm", w) / tps("hf", w), 2),
            "vllm_lora_over_hf_lora": round(tps("vllm_lora_grouped", w) / tps("hf_lora", w), 2),
            "grouped_over_reference_lora_ops": round(tps("vllm_lora_grouped", w) / tps("vllm_lora_reference", w), 2),
            "vllm_lora_grouped_over_no_lora": round(tps("vllm_lora_grouped", w) / tps("vllm", w), 2),
        }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
