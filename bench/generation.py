"""The same 64 chats (max_tokens 64) through the vLLM and transformers engines, side by side.

Prints one JSON object: tokens/s of each backend and their ratio. `python bench/generation.py`
"""

from __future__ import annotations

import json
import time

from engine.base import make_engine
from engine.types import Request, Sampling

TOPICS = ["rain", "chess", "bread", "rivers", "trains", "bees", "volcanoes", "libraries"]
ASKS = ["Explain {} to a child.", "Give two facts about {}.", "Write a short poem about {}.",
        "Why do people like {}?", "Describe {} in one paragraph.", "List three questions about {}.",
        "What is surprising about {}?", "Summarise the history of {}."]


def chats() -> list[Request]:
    return [Request.chat(a.format(t)) for a in ASKS for t in TOPICS]


def measure(kind: str, requests: list[Request], sampling: Sampling) -> dict:
    t0 = time.perf_counter()
    with make_engine(kind, "tiny") as eng:
        start = time.perf_counter() - t0
        eng.generate(requests[:2], sampling)  # warm-up (first call compiles/allocates)
        t1 = time.perf_counter()
        out = eng.generate(requests, sampling)
        wall = time.perf_counter() - t1
    toks = sum(c.completion_tokens for c in out)
    return {"startup_s": round(start, 1), "wall_s": round(wall, 2), "tokens": toks,
            "tokens_per_s": round(toks / wall, 1)}


if __name__ == "__main__":
    reqs = chats()
    sampling = Sampling(max_tokens=64, temperature=0.0)
    res = {"chats": len(reqs), "max_tokens": 64, "vllm": measure("vllm", reqs, sampling),
           "hf": measure("hf", reqs, sampling)}
    res["vllm_over_hf"] = round(res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"], 2)
    print(json.dumps(res))
