"""Run training in its own process, so the GPU (or RAM) is fully released when it returns and generation
(vLLM) and training can take turns on one device.

`train_in_subprocess("dpo", data=..., out=..., cfg=..., ...)` spawns a fresh interpreter (multiprocessing
"spawn": no CUDA state is inherited), runs `train.dpo.train_dpo` / `train.em.train_em` there and returns its
manifest; an error in the child is raised here as TrainError with the child's message.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any

from cai_bootstrap.train.common import TrainError
from cai_bootstrap.train.kinds import KINDS


def _target(kind: str):
    return KINDS[kind].target()


def _child(kind: str, kwargs: dict, q) -> None:
    try:
        q.put(("ok", _target(kind)(**kwargs)))
    except BaseException as e:  # report everything, including a KeyboardInterrupt in the child
        q.put(("error", f"{type(e).__name__}: {e}", traceback.format_exc(), isinstance(e, TrainError)))


def train_in_subprocess(kind: str, **kwargs: Any) -> dict:
    if kind not in KINDS:
        raise TrainError(f"unknown training kind {kind!r}: use {', '.join(KINDS)}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, kwargs, q), name=f"train-{kind}")
    proc.start()
    import queue

    try:
        while True:  # poll, so a child killed by the OS (OOM) is noticed instead of waited on forever
            try:
                msg = q.get(timeout=2)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise TrainError(f"training subprocess ({kind}) died with exit code {proc.exitcode} "
                                     "before reporting (killed? out of memory?)") from None
    except BaseException:
        proc.terminate()
        proc.join()
        raise
    proc.join()
    if msg[0] == "ok":
        return msg[1]
    _, text, tb, is_input_error = msg
    if is_input_error:
        raise TrainError(text.split(": ", 1)[1])
    raise TrainError(f"training subprocess ({kind}) failed: {text}\n{tb}")


def run_training(kind: str, **kwargs: Any) -> dict:
    """On CUDA, train in a fresh process (the GPU is fully released for the next generation engine), or in one
    process per GPU through accelerate's FSDP (train.launch) where the profile trains over several; on CPU in this
    one, where nothing needs releasing and a child would pay ~10 s of imports per stage."""
    import torch

    from cai_bootstrap.engine.models import get_profile

    if not torch.cuda.is_available():
        return _target(kind)(**kwargs)
    processes = get_profile(kwargs.get("profile", "tiny")).train_processes
    if processes > 1:
        from cai_bootstrap.train.launch import launch

        if processes > torch.cuda.device_count():
            raise TrainError(f"profile {kwargs.get('profile')!r} trains over {processes} GPUs (one process each); "
                             f"this machine has {torch.cuda.device_count()}")
        return launch(kind, processes, **kwargs)
    return train_in_subprocess(kind, **kwargs)
