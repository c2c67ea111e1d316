"""Throughput a model profile has been measured at, for `estimate`: a run's ledger, or bench/gpu_smoke.py run on
that model (`--profile NAME`) on a GPU. A figure counts only for the profile it was measured on: gpu_smoke's
scaled-down random model never stands in for a 7B one.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from pydantic import BaseModel

from cai_bootstrap.core.io import open_sqlite
from cai_bootstrap.engine.models import Profile, get_profile

# bench/gpu_smoke.py writes its JSON here (`--out`); a checkout has it, an installed wheel reads none
SMOKE_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
# phases whose ledger rows are generation by the policy's engine: tokens out over engine seconds
GENERATION_PHASES = ("generate", "em-answer", "eval-answer")


class Measured(BaseModel):
    value: float
    source: str


def _plain_vllm(run_dir: Path) -> bool:
    """Whether a run generated on the plain vLLM engine, as `estimate` prices: not on Ray workers (a call's
    seconds there include its replicas' start-up) and not on transformers."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and not cfg.get("ray") and cfg.get("engine", "auto") in ("auto", "vllm")


def from_ledgers(profile: str, runs: Path) -> dict[str, Measured]:
    """Generation tokens/s over the ledgers of the runs under `runs` that generated on the plain vLLM engine:
    rows of this profile that the engine made (not served from a cache)."""
    out_tokens, seconds, rows, ledgers = 0, 0.0, 0, 0
    for path in sorted(runs.glob("*/ledger.sqlite")):
        if not _plain_vllm(path.parent):
            continue
        db = open_sqlite(path, readonly=True)
        try:
            n, t, s = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(tokens_out),0), COALESCE(SUM(seconds),0) FROM ledger WHERE "
                f"kind='engine' AND model=? AND cached=0 AND tokens_out>0 AND seconds>0 AND phase IN "
                f"({','.join('?' * len(GENERATION_PHASES))})", (profile, *GENERATION_PHASES)).fetchone()
        except sqlite3.DatabaseError:  # a ledger from another version, or torn: not a measurement
            continue
        finally:
            db.close()
        if n:
            out_tokens, seconds, rows, ledgers = out_tokens + t, seconds + s, rows + n, ledgers + 1
    if not rows:
        return {}
    return {"est_tokens_per_s": Measured(
        value=round(out_tokens / seconds, 1),
        source=f"ledger: {out_tokens:,} tokens in {seconds:,.0f} s over {rows} generation rows of {ledgers} run(s) "
               f"under {runs}")}


def from_smoke(profile: str, folder: Path = SMOKE_RESULTS) -> dict[str, Measured]:
    """gpu_smoke figures for this profile, on a GPU (the newest file by name wins): generation tokens/s and engine
    start-up from its LoRA phase. Its training figures are not taken: its rows are a few dozen tokens, where a
    step's fixed costs dominate, not the recipe's lengths `estimate` prices."""
    found: dict[str, Measured] = {}
    for path in sorted(folder.glob("gpu_smoke*.json")):  # dated names: later files override earlier ones
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(res, dict) or res.get("profile") != profile or res.get("device") in (None, "cpu"):
            continue
        where = f"bench/gpu_smoke.py on {res['device']} ({path.name})"
        if isinstance(gen := res.get("vllm_lora"), dict) and "tokens_per_s" in gen:
            found["est_tokens_per_s"] = Measured(value=gen["tokens_per_s"], source=where)
            found["est_start_s"] = Measured(value=gen["start_s"], source=where)
    return found


def measured_profile(name: str, runs: Path, smoke: Path = SMOKE_RESULTS) -> tuple[Profile, dict[str, str]]:
    """The profile with its throughput figures replaced by measured ones where there are any, and where each
    replaced figure comes from. A run's ledger wins over gpu_smoke for generation: it measured the real workload."""
    p = get_profile(name)
    found = {**from_smoke(name, smoke), **from_ledgers(name, runs)}
    if not found:
        return p, {}
    update = {k: m.value for k, m in found.items()}
    measured = sorted(set(p.est_measured) | set(found))
    return p.model_copy(update={**update, "est_measured": measured}), {k: m.source for k, m in found.items()}
