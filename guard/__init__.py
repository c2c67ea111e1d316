"""guard package: Llama Guard 3 safety filtering of prompts and answers.

`load_guard` picks the guard for a run; `guard.policy.decide` turns a verdict into keep/drop/quarantine.
Heavy imports (torch, transformers) happen only inside `load_guard`.
"""

from __future__ import annotations

from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.guard.base import Guard, GuardPolicy, Verdict

__all__ = ["Guard", "GuardPolicy", "Verdict", "load_guard"]

GUARD_NAMES = ("llama-guard-3-8b", "llama-guard-3-1b", "tiny", "none")


def load_guard(name: str | None, profile_name: str = "tiny", **kw) -> Guard:
    """The guard for a run.

    - `name="none"`: an explicit opt-out (`NoGuard`, verdicts say guard 'none').
    - `name=None`: the run's profile decides: `tiny` runs (or no CUDA) get the tiny stand-in, GPU runs
      get llama-guard-3-8b.
    - a Llama Guard profile: the real model on CUDA; on CPU the tiny model stands in for it (every
      verdict says `stand_in=True`), since an 8B/1B guard in fp32 on CPU would dominate the run.
    - `tiny`: the stand-in, explicitly.
    `kw` (threshold, batch_size, ...) go to `LlamaGuard`.
    """
    if name is not None and name not in GUARD_NAMES:
        raise BadInput(f"unknown guard {name!r}; choose one of {', '.join(GUARD_NAMES)}")
    if name == "none":
        from cai_bootstrap.guard.llama_guard import NoGuard

        return NoGuard()
    import torch

    from cai_bootstrap.guard.llama_guard import LlamaGuard

    cuda = torch.cuda.is_available()
    if name is None:
        name = "llama-guard-3-8b" if cuda and profile_name != "tiny" else "tiny"
    if name == "tiny":
        return LlamaGuard("tiny", **kw)
    if not cuda:
        import logging

        logging.getLogger(__name__).warning(
            "no CUDA: the tiny model stands in for %s (verdicts say stand_in=True; not a real safety filter)", name)
        return LlamaGuard("tiny", stand_in_for=name, **kw)
    return LlamaGuard(name, **kw)
