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

from train.common import TrainError

_TARGETS = {"dpo": ("train.dpo", "train_dpo"), "em": ("train.em", "train_em")}


def _target(kind: str):
    import importlib

    mod, fn = _TARGETS[kind]
    return getattr(importlib.import_module(mod), fn)


def _child(kind: str, kwargs: dict, q) -> None:
    try:
        q.put(("ok", _target(kind)(**kwargs)))
    except BaseException as e:  # report everything, including a KeyboardInterrupt in the child
        q.put(("error", f"{type(e).__name__}: {e}", traceback.format_exc(), isinstance(e, TrainError)))


def train_in_subprocess(kind: str, **kwargs: Any) -> dict:
    if kind not in _TARGETS:
        raise TrainError(f"unknown training kind {kind!r}: use {', '.join(_TARGETS)}")
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
    """On CUDA, train in a fresh process (the GPU is fully released for the next generation engine); on CPU
    in this one, where nothing needs releasing and a child would pay ~10 s of imports per stage."""
    import torch

    if torch.cuda.is_available():
        return train_in_subprocess(kind, **kwargs)
    return _target(kind)(**kwargs)
