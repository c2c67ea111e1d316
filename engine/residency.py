"""One large model resident at a time: the lifecycle of a run's generation engines and guard on one device.

On a GPU, the policy's vLLM engine takes most of the memory (`gpu_memory_utilization`), so Llama Guard, the
trainer, lm-eval and activation capture cannot load beside it. `Residency` holds the run's models by name; each
is wrapped so that using it (generate, check_prompts, check_answers) first releases every other member, and
`vacate()` releases them all before a phase that loads a model of its own (training). A released member is
closed explicitly (vLLM's engine-core process exits, the guard's weights are dropped) and loads again the next
time it is used. On CPU the members stay up across phases by default (start-ups dominate there); `exclusive`
forces the release path, which the tests and bench/residency.py use.

Each release is recorded with the whole process tree's RSS before and after it (and `torch.cuda.mem_get_info`
on CUDA, which sees vLLM's engine process too), so a run can show what a release freed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

USES = ("generate", "check_prompts", "check_answers")  # the calls that need a member's model loaded


def tree_rss(pid: int | None = None) -> tuple[int, int]:
    """(bytes resident, processes) in process `pid` (default: this one) and every process it started (vLLM's
    engine core among them)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total, len(procs)


def cuda_free() -> int | None:
    import torch

    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def hf_placement() -> tuple[str, str]:
    """(device, dtype) for a transformers model loaded outside training (lm-eval, activation capture): bf16 on
    the GPU (a 7B model in fp32 would not fit beside anything), fp32 on the CPU (bf16 matmuls are slow there)."""
    return ("cuda", "bfloat16") if on_cuda() else ("cpu", "float32")


class Residency:
    """The run's large models by name; with `exclusive` (default: on CUDA) at most one holds memory at a time."""

    def __init__(self, exclusive: bool | None = None) -> None:
        self.exclusive = on_cuda() if exclusive is None else exclusive
        self.members: dict[str, Any] = {}
        self.loaded: set[str] = set()  # members that may hold memory (used since their last release)
        self.releases: list[dict] = []  # what each release freed

    def load(self, name: str, factory: Callable[[], Any]) -> Any:
        """Make the member `name` with `factory`: an engine or a guard with `close()`, which loads its model on
        first use (so nothing is released for it until then); returns what the caller should use."""
        model = factory()
        if not getattr(model, "holds_model", True):  # `--guard none`: nothing to release, nothing to wait for
            return model
        self.members[name] = model
        return _Member(self, name, model) if self.exclusive else model

    def use(self, name: str) -> None:
        """`name` is about to run: with `exclusive`, every other loaded member is released first."""
        if self.exclusive:
            self.vacate(keep=name, why=name)
        self.loaded.add(name)

    def vacate(self, keep: str | None = None, why: str = "another phase") -> None:
        """Release every loaded member but `keep`, recording the memory each release freed."""
        for name in [n for n in self.loaded if n != keep]:
            (before, procs_before), cuda_before, t0 = tree_rss(), cuda_free(), time.perf_counter()
            self.members[name].close()
            self.loaded.discard(name)
            after, procs_after = tree_rss()
            self.releases.append({
                "released": name, "for": why, "seconds": round(time.perf_counter() - t0, 2),
                "rss_before_mb": round(before / 2**20), "rss_after_mb": round(after / 2**20),
                "processes_before": procs_before, "processes_after": procs_after,
                **({"cuda_free_before_mb": round(cuda_before / 2**20), "cuda_free_after_mb": round(cuda_free() / 2**20)}
                   if cuda_before is not None else {}),
            })

    def close(self) -> None:
        for model in self.members.values():
            model.close()
        self.members.clear()
        self.loaded.clear()


class _Member:
    """A member as its callers see it: the same object, except that a call that needs its model makes room."""

    def __init__(self, residency: Residency, name: str, model: Any) -> None:
        self._residency, self._name, self._model = residency, name, model

    def __getattr__(self, attr: str):
        value = getattr(self._model, attr)
        if attr in USES:
            def call(*a, _fn: Callable = value, **kw):
                self._residency.use(self._name)
                return _fn(*a, **kw)
            return call
        return value

    def close(self) -> None:
        self._model.close()
        self._residency.loaded.discard(self._name)
