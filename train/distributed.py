"""One training run across several processes (`accelerate launch`, train.launch): every rank trains, the main
rank alone writes the run directory, and the ranks meet at its start and end. A run in one process (every CPU
stage, one GPU) passes straight through.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cai_bootstrap.core.io import partial_dir, resumable_dir


def world_size() -> int:
    """Processes in this run (`accelerate launch` and torchrun set WORLD_SIZE; a plain process has none)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def sharded() -> bool:
    """Whether this process trains under FSDP (`accelerate launch` with train/fsdp_qlora.yaml sets the flag), which
    asks for bf16-stored 4-bit weights, frozen adapters in bf16 and a plain optimizer."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def claim_device() -> None:
    """Join the launch's process group before the model loads: accelerate then sets this rank's GPU as the current
    device, where transformers puts the rank's copy of the 4-bit base (otherwise every rank loads onto GPU 0)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState()


def frozen_adapters_in(model, dtype) -> int:
    """Cast the frozen LoRA weights (a persona adapter under EM, DPO's "ref" copy) to `dtype`: PEFT keeps adapters in
    fp32, and FSDP flattens a frozen adapter into its decoder layer's unit, which must hold one dtype. Trainable LoRA
    layers keep fp32: transformers wraps them in units of their own. Returns how many tensors were cast."""
    n = 0
    for name, param in model.named_parameters():
        if "lora_" in name and not param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            n += 1
    return n


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # joins (or starts) the launch's process group


@contextlib.contextmanager
def shared_resumable_dir(out: str | Path, key: Any, fresh: bool = False) -> Iterator[Path]:
    """`core.io.resumable_dir` for every rank: the main rank prepares the work directory (kept or emptied by
    `key`) before the others enter it, and swaps it in as `out` once every rank has left the block."""
    if world_size() == 1:
        with resumable_dir(out, key, fresh) as work:
            yield work
        return
    if is_main():
        with resumable_dir(out, key, fresh) as work:
            barrier()
            yield work
            barrier()
    else:
        barrier()
        yield partial_dir(out)
        barrier()


def gathered_state(trainer: Any) -> dict | None:
    """The whole model's state dict where FSDP shards it (every rank must call this: it is a collective), or None
    where each rank holds the whole model and PEFT can read it directly."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None
