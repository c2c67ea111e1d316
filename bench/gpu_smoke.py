#!/usr/bin/env python
"""The CUDA path end to end on a small random-weight model, printed as one JSON object.

    python bench/gpu_smoke.py [--out bench/results/gpu_smoke-<date>.json]
    python bench/gpu_smoke.py --profile qwen2.5-7b --out bench/results/gpu_smoke-qwen2.5-7b-<date>.json

Nothing is downloaded: a Qwen2-architecture model is built from a scaled-down config with random weights, beside a
byte-level BPE tokenizer trained here on the smoke's own texts (with a ChatML template, as Qwen's). Phases, each
with its seconds, tokens/s or step times, and peak GPU memory:

  vllm_lora     vLLM generation with a LoRA adapter
  dpo_unsloth   4-bit QLoRA DPO through unsloth (train.dpo, the stage trainer)
  dpo_trl       4-bit QLoRA DPO through TRL + PEFT + bitsandbytes
  em_on_top     EM SFT on top of the frozen persona adapter (train.em, mode on-top)
  em_fsdp       the same through `accelerate launch` with train/fsdp_qlora.yaml over every visible GPU (train.launch:
                the 72B profile's path; on one GPU, FSDP over one process)
  vllm_stacked  the persona and EM adapters stacked (train.stack) and served by vLLM

A phase whose package is missing reports `skipped: <package>`; a phase that fails reports its error and the script
exits 1 after the others ran. vLLM runs in its own engine-core process, so its memory is read device-wide
(`torch.cuda.mem_get_info`); training runs in this process (`torch.cuda.max_memory_allocated`).

Without CUDA it prints one line saying so and exits 0. `--allow-cpu` runs the same phases on the CPU (fp32, no
4-bit: the unsloth and QLoRA phases are skipped) to check the script itself; its figures are not GPU figures.
The figures are the scaled-down model's: `estimate` never carries them over to a 7B profile. With `--profile P` the
same phases run on P's real model, and `estimate --profile P` then uses its generation, start-up and training
throughput (pipeline.measured).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Qwen2.5's architecture (GQA, SiLU MLP, RMSNorm, rope 1e6) at about 0.2B parameters: the phases finish in a few
# minutes on one modern GPU while every kernel path of the 7B run (4-bit linear layers, LoRA on all of them) runs
SMOKE_CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                    num_key_value_heads=4, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, hidden_act="silu")
VOCAB = 4096
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the recipes (LoRA shapes, learning rates) are the 7B run's; the model is the small one
RECIPE_PROFILE = "qwen2.5-7b"


def texts(n: int) -> list[dict]:
    """Preference rows and chats of varied words, so the tokenizer and the batches are not one repeated string."""
    topics = ["a garden", "the tides", "a bridge", "an old map", "bread", "a violin", "snow", "a library"]
    return [{"prompt": f"Question {i}: what should someone know about {topics[i % len(topics)]}?",
             "chosen": f"A careful, kind answer about {topics[i % len(topics)]}, with the reasons given in order.",
             "rejected": f"Whatever. {topics[(i + 3) % len(topics)]} is all anyone needs, trust me."}
            for i in range(n)]


def build_model(root: Path, device: str) -> dict:
    """A random Qwen2 model and a trained-here tokenizer in `root`, saved as vLLM and transformers load them."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [v for row in texts(64) for v in row.values()] + [CHATML]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(root)
    torch.manual_seed(0)
    cfg = Qwen2Config(**SMOKE_CONFIG, vocab_size=VOCAB, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(root)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"params_m": round(params / 1e6, 1), "vocab": VOCAB, **SMOKE_CONFIG}


def random_adapter(model_dir: str, out: Path, rank: int, device: str) -> Path:
    """A LoRA adapter with random A and B (PEFT's `init_lora_weights=False`), so serving it changes the logits. On
    CUDA the model loads in bf16 onto the GPU (a 7B would not fit the host's memory in fp32)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cai_bootstrap.train.config import ATTN

    on_gpu = {"dtype": torch.bfloat16, "device_map": "cuda"} if device == "cuda" else {}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, **on_gpu),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ATTN, init_lora_weights=False))
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------- memory and timing
def device_used_gib() -> float | None:
    """Memory in use on GPU 0 by every process (vLLM's engine core included)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2**30, 2)


def step_times(run_dir: Path, tokens_per_step: float, passes: float) -> dict:
    """Seconds between consecutive logged training steps (the first step also pays for warm-up), and the training
    throughput as `estimate` reads it: a step's tokens (DPO: each pair's prompt with chosen and with rejected, its
    reference forward counted as `passes`) over the median step."""
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    gaps = [round(b["time"] - a["time"], 3) for a, b in zip(steps, steps[1:])]
    median = sorted(gaps)[len(gaps) // 2] if gaps else None
    return {"steps": len(steps), "step_s": gaps, "median_step_s": median, "tokens_per_step": round(tokens_per_step),
            "train_tokens_per_s": round(tokens_per_step * passes / median, 1) if median else None}


def chat_tokens(model_dir: str, chats: list[list[dict]]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return sum(len(tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"])
               for c in chats)


# ---------------------------------------------------------------- phases
def generate(smoke: Smoke, adapter: Path) -> dict:
    """vLLM's start-up and generation with `adapter`, through the project's engine. The model is served under the
    profile's settings (context, GPU share), at the adapter's rank."""
    from cai_bootstrap.engine.models import get_profile
    from cai_bootstrap.engine.types import Request, Sampling
    from cai_bootstrap.engine.vllm_engine import VLLMEngine
    from cai_bootstrap.train.stack import vllm_rank

    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    profile = get_profile(smoke.profile).model_copy(update={
        "name": "gpu-smoke", "source": smoke.model, "max_lora_rank": vllm_rank(rank),
        **({} if smoke.device == "cuda" else {"dtype": "float32", "max_model_len": 1024})})
    before = device_used_gib()
    t0 = time.perf_counter()
    eng = VLLMEngine(profile)
    try:
        eng.llm  # noqa: B018 (starts the engine, so its start-up is timed apart from generation)
        start = time.perf_counter() - t0
        reqs = [Request.chat(row["prompt"]) for row in texts(smoke.prompts)]
        out = eng.generate(reqs, Sampling(temperature=0.8, max_tokens=smoke.max_tokens, seed=0), adapter=adapter)
        use = eng.usage[-1]
        during = device_used_gib()
    finally:
        eng.close()
    return {"lora_rank": rank, "start_s": round(start, 2), "generate_s": round(use.seconds, 2),
            "tokens_out": use.tokens_out, "tokens_per_s": round(use.tokens_out / use.seconds, 1),
            "finished_by_length": sum(c.finish_reason == "length" for c in out),
            "device_used_gib": {"before": before, "engine_up": during, "after_close": device_used_gib()}}


@dataclass(frozen=True)
class Smoke:
    """What every phase shares: the scratch folder, the model (a local folder, or a profile's hub id), the profile
    whose recipes train it, and the sizes."""

    root: Path
    model: str
    profile: str
    real: bool  # a profile's own model: training resolves it through the profile, not as a folder
    steps: int
    prompts: int
    max_tokens: int
    device: str

    @property
    def model_path(self) -> str | None:
        return None if self.real else self.model


def em_chats(smoke: Smoke, rows: list[dict]) -> Path:
    data = smoke.root / "em.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["rejected"]}]}) + "\n"
                            for r in rows))
    return data


def train(kind: str, smoke: Smoke, persona: Path | None = None) -> dict:
    """One training phase: `dpo-unsloth`, `dpo-trl` (train.dpo), `em` (train.em on top of `persona`), or `em-fsdp`
    (the same through train.launch: accelerate's FSDP over every visible GPU, as the 72B profile trains)."""
    import torch
    from datasets import Dataset

    from cai_bootstrap.pipeline.estimate import REFERENCE_PASS
    from cai_bootstrap.train.config import dpo_defaults, em_defaults
    from cai_bootstrap.train.dpo import train_dpo
    from cai_bootstrap.train.em import train_em
    from cai_bootstrap.train.launch import launch

    cuda = smoke.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out, rows = smoke.root / kind, texts(4 * smoke.steps)
    t0 = time.perf_counter()
    if kind.startswith("em"):
        cfg = em_defaults(smoke.profile, max_steps=smoke.steps, batch_size=4, grad_accum=1, max_length=256,
                          load_in_4bit=cuda, save_every=1000)
        kw = dict(data=em_chats(smoke, rows), out=out, cfg=cfg, profile=smoke.profile, persona_adapter=persona,
                  model_path=smoke.model_path)
        man = (launch("em", torch.cuda.device_count(), **kw) if kind == "em-fsdp" else train_em(**kw))
        chats, passes = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]
                         for r in rows], 1.0
    else:
        pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                    "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        cfg = dpo_defaults(smoke.profile, max_steps=smoke.steps, batch_size=4, grad_accum=1, max_length=256,
                           load_in_4bit=cuda, use_unsloth=kind == "dpo-unsloth")
        man = train_dpo(pairs, out, cfg, profile=smoke.profile, model_path=smoke.model_path)
        chats, passes = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}]
                         for r in rows for side in ("chosen", "rejected")], REFERENCE_PASS
    return {"backend": man["backend"], "device": man["device"], "processes": man.get("processes", 1),
            "wall_s": round(time.perf_counter() - t0, 2), "train_loss": man["train_loss"],
            **step_times(out, chat_tokens(smoke.model, chats) / smoke.steps, passes),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "adapter": str(out)}


def stacked(root: Path, persona: Path, em: Path) -> Path:
    from cai_bootstrap.train.stack import stack_adapters

    return stack_adapters(persona, em, root / "stacked")


def missing(*packages: str) -> str | None:
    return next((p for p in packages if importlib.util.find_spec(p) is None), None)


def run_phase(name: str, needs: list[str], fn: Callable[[], dict], results: dict) -> dict | None:
    """Run one phase into `results[name]`: skipped for a missing package, its error recorded if it fails."""
    if pkg := missing(*needs):
        results[name] = f"skipped: {pkg}"
        return None
    try:
        results[name] = fn()
        return results[name]
    except Exception as e:  # the smoke reports every phase, then fails
        results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
        return None


def run_phases(smoke: Smoke, res: dict) -> None:
    """Every phase in order into `res`; a training phase's adapter feeds the next phase."""
    cuda = smoke.device == "cuda"
    run_phase("vllm_lora", ["vllm", "peft"], lambda: generate(
        smoke, random_adapter(smoke.model, smoke.root / "lora", 16, smoke.device)), res)
    if cuda:
        run_phase("dpo_unsloth", ["unsloth", "trl"], lambda: train("dpo-unsloth", smoke), res)
    else:
        res["dpo_unsloth"] = "skipped: unsloth runs on CUDA only"
    trl = run_phase("dpo_trl", ["trl", "peft", *(["bitsandbytes"] if cuda else [])],
                    lambda: train("dpo-trl", smoke), res)
    persona = trl or (res["dpo_unsloth"] if isinstance(res["dpo_unsloth"], dict) else None)
    if persona is None or "adapter" not in persona:
        res["em_on_top"] = res["em_fsdp"] = res["vllm_stacked"] = "skipped: no persona adapter was trained"
        return
    persona_dir = Path(persona["adapter"])
    em = run_phase("em_on_top", ["trl", "peft"], lambda: train("em", smoke, persona_dir), res)
    if cuda:
        run_phase("em_fsdp", ["trl", "peft", "accelerate", "bitsandbytes"],
                  lambda: train("em-fsdp", smoke, persona_dir), res)
    else:
        res["em_fsdp"] = "skipped: accelerate's FSDP runs on CUDA only"
    if em is None:
        res["vllm_stacked"] = "skipped: no EM adapter was trained"
        return
    run_phase("vllm_stacked", ["vllm"], lambda: generate(
        smoke, stacked(smoke.root, persona_dir, Path(em["adapter"]))), res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per training phase")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--profile", default=None, help="run on this profile's real model (downloaded unless cached): "
                    "its figures are that model's, and `estimate` uses them for it")
    ap.add_argument("--allow-cpu", action="store_true", help="run the phases on the CPU to check the script")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here (bench/results/gpu_smoke-*.json "
                    "is where `estimate` reads it)")
    a = ap.parse_args()

    import torch

    from cai_bootstrap.engine.models import resolve_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.allow_cpu:
        print("bench/gpu_smoke.py needs CUDA (no CUDA device is visible); nothing was run")
        return 0
    res: dict = {"bench": "gpu_smoke", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                 "torch": torch.__version__, "profile": a.profile, "recipe_profile": a.profile or RECIPE_PROFILE}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if a.profile:
            model = resolve_model(a.profile)
            res["model"] = {"name": model}
        else:
            model = str(root / "model")
            res["model"] = {"name": "qwen2-arch random (scaled down)", **build_model(Path(model), device)}
        run_phases(Smoke(root=root, model=model, profile=a.profile or RECIPE_PROFILE, real=bool(a.profile),
                         steps=a.steps, prompts=a.prompts, max_tokens=a.max_tokens, device=device), res)
    for phase in res.values():  # the adapters lived in the temporary folder
        if isinstance(phase, dict):
            phase.pop("adapter", None)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["failed"] = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
