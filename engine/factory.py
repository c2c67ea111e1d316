"""Picks and builds an engine: kept apart from `engine.base`, which both engines import."""

from __future__ import annotations

from cai_bootstrap.engine.base import Engine
from cai_bootstrap.engine.models import Profile
from cai_bootstrap.engine.types import EngineError


def make_engine(kind: str = "auto", profile: Profile | str = "tiny", max_lora_rank: int | None = None,
                ray: str | None = None, **kw) -> Engine:
    """`vllm`, `hf`, or `auto` (vLLM when installed, transformers otherwise). `max_lora_rank`: the largest adapter
    vLLM will serve (default: the profile's); transformers serves any rank. `ray` ("local" or a cluster's
    address): vLLM engines on Ray Data workers, the profile's `data_parallel_size` of them."""
    if kind == "auto":
        import importlib.util

        kind = "vllm" if importlib.util.find_spec("vllm") else "hf"
    if ray is not None:
        if kind != "vllm":
            raise EngineError(f"--ray runs vLLM engines on Ray workers; engine {kind!r} cannot")
        from cai_bootstrap.engine.ray_engine import RayEngine

        return RayEngine(profile, ray, max_lora_rank=max_lora_rank, **kw)
    if kind == "vllm":
        from cai_bootstrap.engine.vllm_engine import VLLMEngine

        return VLLMEngine(profile, max_lora_rank=max_lora_rank, **kw)
    if kind == "hf":
        from cai_bootstrap.engine.hf_engine import HFEngine

        return HFEngine(profile, **kw)
    raise EngineError(f"unknown engine {kind!r}: use vllm, hf or auto")
