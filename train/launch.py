"""Training across processes through `accelerate launch`: the shipped FSDP config (train/fsdp_qlora.yaml) shards a
QLoRA run over a machine's GPUs (the 72B profile's 4), one trainer per GPU.

`launch("dpo", processes=4, data=..., out=..., cfg=..., profile=...)` writes the call to a JSON file, runs
`accelerate launch ... -m cai_bootstrap.train.launch CALL.json` (every rank runs `train.dpo.train_dpo` /
`train.em.train_em`, train.distributed keeps the writes on the main rank) and returns the manifest the main
rank wrote. With `cpu=True` the same path runs on CPU processes over gloo: accelerate turns FSDP on only on
accelerators, so there they train data-parallel (each holds the whole model), which is how the launch path is
tested on the tiny model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cai_bootstrap.core.errors import CaiError
from cai_bootstrap.train.common import TrainError
from cai_bootstrap.train.kinds import KINDS

FSDP_CONFIG = Path(__file__).with_name("fsdp_qlora.yaml")


class LaunchFailed(CaiError, RuntimeError):
    """A launch whose processes crashed (out of memory, a lost rank): not the input's fault, exit code 1."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(call: Path, processes: int, config: Path) -> list[str]:
    """The `accelerate launch` command line for one training call (a JSON file written by `launch`)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()),
            "-m", __name__, str(call)]


def cpu_config(config: Path, out: Path) -> Path:
    """`config` for CPU processes: the same torchrun launch, over gloo and data-parallel (each process holds the
    whole model). accelerate's FSDP plugin refuses to start without an accelerator, and its CPU launcher needs
    mpirun; its multi-GPU launcher with `use_cpu` starts torchrun's processes on the CPU."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg.pop("fsdp_config", None)
    cfg.update(distributed_type="MULTI_GPU", use_cpu=True)
    out.write_text(yaml.safe_dump(cfg))
    return out


def launch(kind: str, processes: int, cpu: bool = False, log: Path | None = None, config: Path = FSDP_CONFIG,
           **kwargs: Any) -> dict:
    """Train `kind` ("dpo" or "em") over `processes` processes; returns the run's manifest. The processes' output
    goes to `log` (default: a file beside the adapter). Bad input raises TrainError with the training's message; any
    other failure LaunchFailed, with the log's last lines."""
    if kind not in KINDS:
        raise TrainError(f"unknown training kind {kind!r}: use {', '.join(KINDS)}")
    out = Path(kwargs["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    log = log or out.with_name(f"{out.name}.launch.log")
    with tempfile.TemporaryDirectory() as tmp:
        call, result = Path(tmp) / "call.json", Path(tmp) / "manifest.json"
        cfg = kwargs.pop("cfg", None)
        call.write_text(json.dumps({"kind": kind, "result": str(result), "cfg": cfg.model_dump() if cfg else None,
                                    "kwargs": {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}}))
        env = dict(os.environ)  # the ranks import `cai_bootstrap` as this process does: the same installed package
        if cpu:
            config = cpu_config(config, Path(tmp) / "cpu.yaml")
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))  # cores shared out
        with log.open("a") as fh:
            proc = subprocess.run(launch_command(call, processes, config), stdout=fh, stderr=subprocess.STDOUT,
                                  env=env)
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
        if (bad := result.with_suffix(".bad_input")).is_file():  # the training's own input error, said as such
            raise TrainError(bad.read_text())
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise LaunchFailed(f"{kind} training over {processes} processes failed (exit {proc.returncode}); its "
                           f"output is in {log}; last lines:\n{tail}")




def _run(call_file: str) -> None:
    """One rank: rebuild the call, train, and (main rank) write the manifest where `launch` reads it."""
    from cai_bootstrap.train.distributed import is_main

    call = json.loads(Path(call_file).read_text())
    kind = call["kind"]
    kwargs = dict(call["kwargs"])
    if call["cfg"] is not None:
        kwargs["cfg"] = KINDS[kind].config(**call["cfg"])
    try:
        manifest = KINDS[kind].target()(**kwargs)
    except TrainError as e:  # bad input (data, adapter, base): `launch` raises it as such, not as a crash
        if is_main():
            Path(call["result"]).with_suffix(".bad_input").write_text(str(e))
        raise
    if is_main():
        Path(call["result"]).write_text(json.dumps(manifest))


if __name__ == "__main__":
    _run(sys.argv[1])
