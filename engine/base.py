"""What both engines share: prompt rendering, input checks, adapter ids, usage records."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

from cai_bootstrap.engine.models import Profile, get_profile, model_fingerprint, resolve_model
from cai_bootstrap.engine.types import CallUsage, Completion, EngineError, Request, Sampling


def adapter_hash(adapter: str | Path) -> str:
    """Content hash of a PEFT adapter directory: it changes when the weights or config change."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise EngineError(f"adapter directory {path} has no adapter_config.json (missing or not a PEFT adapter)")
    h = hashlib.sha256()
    for f in sorted(path.glob("adapter_*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class Engine:
    """Base: subclasses implement `_generate(prompts_token_ids, sampling, adapter)`."""

    name = "base"

    def __init__(self, profile: Profile | str = "tiny") -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.model_path = resolve_model(self.profile)
        self.fingerprint = model_fingerprint(self.profile)
        self.usage: list[CallUsage] = []
        self.calls = 0
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)

    # --- context manager: leaving releases memory (generation and training share a GPU in turn)
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # --- prompts
    def render(self, request: Request) -> str:
        if request.prompt is not None:
            return request.prompt
        if not self.profile.chat or self.tokenizer.chat_template is None:
            raise EngineError(f"profile {self.profile.name!r} is a base model: send raw prompts, not messages")
        text = self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True,
                                                  **self.profile.chat_template_kwargs)
        return text + (request.prefix or "")

    def encode(self, requests: Sequence[Request], sampling: Sampling) -> list[list[int]]:
        ids = []
        for i, req in enumerate(requests):
            toks = self.tokenizer(self.render(req), add_special_tokens=False)["input_ids"]
            if len(toks) + sampling.max_tokens > self.profile.max_model_len:
                raise EngineError(
                    f"request {i} is {len(toks)} prompt tokens + max_tokens {sampling.max_tokens}, over the "
                    f"context length {self.profile.max_model_len} of profile {self.profile.name!r}"
                )
            ids.append(toks)
        return ids

    # --- the interface
    def generate(
        self, requests: Sequence[Request], sampling: Sampling | None = None, adapter: str | Path | None = None
    ) -> list[Completion]:
        """All requests in one batched call; returns n completions per request, request-major."""
        sampling = sampling or Sampling()
        if not requests:
            return []
        if adapter is not None:
            adapter_hash(adapter)  # fails early and clearly for a missing adapter
        prompt_ids = self.encode(requests, sampling)
        t0 = time.perf_counter()
        out = self._generate(prompt_ids, sampling, str(adapter) if adapter else None)
        self.calls += 1
        self.usage.append(
            CallUsage(
                engine=self.name,
                requests=len(requests),
                tokens_in=sum(len(p) for p in prompt_ids) * sampling.n,
                tokens_out=sum(c.completion_tokens for c in out),
                seconds=time.perf_counter() - t0,
                adapter=str(adapter) if adapter else None,
            )
        )
        return out

    def generate_ids(self, prompt_ids: list[list[int]], sampling: Sampling, adapter: str | None = None
                     ) -> list[Completion]:
        """Prompts tokenized already (a Ray worker's batch, engine.ray_engine): the engine's own generation,
        unrecorded (the engine that tokenized them records the call)."""
        return self._generate(prompt_ids, sampling, str(adapter) if adapter else None)

    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling, adapter: str | None) -> list[Completion]:
        raise NotImplementedError

