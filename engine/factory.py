"""Picks and builds an engine: kept apart from `engine.base`, which both engines import."""

from __future__ import annotations

from engine.base import Engine
from engine.models import Profile
from engine.types import EngineError


def make_engine(kind: str = "auto", profile: Profile | str = "tiny", max_lora_rank: int | None = None,
                **kw) -> Engine:
    """`vllm`, `hf`, or `auto` (vLLM when installed, transformers otherwise). `max_lora_rank`: the largest adapter
    vLLM will serve (default: the profile's); transformers serves any rank."""
    if kind == "auto":
        import importlib.util

        kind = "vllm" if importlib.util.find_spec("vllm") else "hf"
    if kind == "vllm":
        from engine.vllm_engine import VLLMEngine

        return VLLMEngine(profile, max_lora_rank=max_lora_rank, **kw)
    if kind == "hf":
        from engine.hf_engine import HFEngine

        return HFEngine(profile, **kw)
    raise EngineError(f"unknown engine {kind!r}: use vllm, hf or auto")
