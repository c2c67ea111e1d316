#!/usr/bin/env python
"""DPO training throughput: steps/s and peak memory, printed as one JSON object.

CPU (default): the tiny profile, fp32 TRL + PEFT.
GPU: `python bench/train.py --random-config qwen2.5-0.5b --device cuda --4bit [--backend unsloth|trl]` builds a
Qwen2.5-0.5B-shaped model from its config with random weights (nothing is downloaded; the tiny model's
tokenizer supplies token ids, all below the Qwen vocabulary size) and times QLoRA DPO steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

# Qwen2.5-0.5B's published architecture (config.json), so no hub access is needed
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")


def random_model_dir(name: str, root: Path) -> str:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from cai_bootstrap.engine.models import resolve_model

    if name != "qwen2.5-0.5b":
        raise SystemExit(f"unknown --random-config {name!r}: only qwen2.5-0.5b")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(resolve_model("tiny")).save_pretrained(root / "model")
    return str(root / "model")


def pairs(n: int, words: int):
    from datasets import Dataset

    body = " ".join(["word"] * words)
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"Question {i}: {body}?"}],
         "chosen": [{"role": "assistant", "content": f"A careful, kind answer {i}: {body}."}],
         "rejected": [{"role": "assistant", "content": f"A rude answer {i}: {body}!"}]}
        for i in range(n)
    ])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--words", type=int, default=20, help="filler words per text (sets the sequence length)")
    ap.add_argument("--random-config", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--4bit", dest="four_bit", action="store_true")
    ap.add_argument("--backend", default="auto", choices=["auto", "unsloth", "trl"])
    a = ap.parse_args()

    import torch

    from cai_bootstrap.train.config import dpo_defaults
    from cai_bootstrap.train.dpo import train_dpo

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if a.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("CUDA is visible: run with CUDA_VISIBLE_DEVICES= for the CPU figure")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = random_model_dir(a.random_config, tmp) if a.random_config else None
        cfg = dpo_defaults("tiny" if a.device == "cpu" else "qwen2.5-7b", batch_size=a.batch, grad_accum=1,
                           max_steps=a.steps, max_length=512, load_in_4bit=a.four_bit,
                           use_unsloth=a.backend in ("auto", "unsloth"))
        t0 = time.perf_counter()
        man = train_dpo(pairs(a.batch * a.steps, a.words), tmp / "out", cfg, profile="tiny", model_path=model_path)
        total = time.perf_counter() - t0
        log = [json.loads(x) for x in (tmp / "out" / "train_log.jsonl").read_text().splitlines()]
    summary = next((r for r in log if "train_runtime" in r), {})
    fig = {
        "bench": "train.dpo",
        "model": a.random_config or "tiny (SmolLM2-135M-Instruct)",
        "device": man["device"],
        "backend": man["backend"],
        "steps": man["steps"],
        "batch_pairs": a.batch,
        "train_runtime_s": summary.get("train_runtime"),
        "steps_per_s": summary.get("train_steps_per_second"),
        "wall_s_incl_load": round(total, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if a.device == "cuda" else None,
        "final_margin": next((r["rewards/margins"] for r in reversed(log) if "rewards/margins" in r), None),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
