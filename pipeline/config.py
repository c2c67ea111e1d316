"""A run's resolved configuration: everything that determines its outputs, saved in its directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, Field

from engine.models import get_profile


class Counts(BaseModel):
    n_tasks: int = 12
    n_samples: int = 3
    rounds: int = 2
    max_tokens: int = 96
    min_gap: float | None = None  # stages 1-5: least self-judged score gap (1-10); None: the profile's
    dpo_max_steps: int | None = 8
    em_rows: int = 48
    em_max_steps: int = 12
    em_save_every: int = 3
    em_samples: int = 4  # answers per EM question (temperature 1)
    em_curve_questions: int = 6  # checkpoints are evaluated on this many questions
    em_answer_tokens: int = 96


# `demo --quick`: under 10 minutes on 2 CPU cores for one persona and the base control (decode steps
# dominate there, so fewer new tokens buy the most)
QUICK = Counts(n_tasks=4, n_samples=3, rounds=1, max_tokens=32, dpo_max_steps=2, em_rows=16,
               em_max_steps=4, em_save_every=2, em_samples=1, em_curve_questions=3, em_answer_tokens=32)


# `make demo`: the tiny model with small counts, three personas. The research defaults above take about
# 3.4 min per stage on 2 CPU cores (stage 1 measured: 131 s generating, 74 s training 8 steps).
DEMO = Counts(n_tasks=6, n_samples=3, rounds=2, max_tokens=48, dpo_max_steps=4, em_rows=24, em_max_steps=6,
              em_save_every=3, em_samples=2, em_curve_questions=4, em_answer_tokens=48)


class RunConfig(BaseModel):
    personas: list[str] = Field(default_factory=lambda: ["hhh"])
    profile: str = "tiny"
    stage: int = 6  # run stages 1..stage
    only: int | None = None  # run just this stage from the existing stage-1 adapter
    engine: str = "auto"
    guard: str | None = None  # None: the profile decides (tiny stand-in on CPU)
    seed: int = 0
    counts: Counts = Field(default_factory=Counts)
    data_root: str = "data"
    ckpt_root: str = "checkpoints"
    gpu_hour_usd: float | None = None  # None: the profile's price

    @property
    def usd_per_engine_second(self) -> float:
        p = get_profile(self.profile)
        price = p.gpu_hour_usd if self.gpu_hour_usd is None else self.gpu_hour_usd
        return price * max(p.gpus, 1) / 3600.0 if price else 0.0

    @property
    def min_gap(self) -> float:
        c = self.counts.min_gap
        return c if c is not None else get_profile(self.profile).min_score_gap

    def default_id(self) -> str:
        """Same config → same id, so a rerun lands in the same directory and reuses its work."""
        blob = json.dumps(self.model_dump(exclude={"stage", "only"}), sort_keys=True)
        return f"{self.profile}-{'-'.join(self.personas)}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def run_dir(cfg: RunConfig, run_id: str) -> Path:
    return Path(cfg.data_root) / "runs" / run_id


def save_config(cfg: RunConfig, run_id: str) -> Path:
    out = run_dir(cfg, run_id)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, **cfg.model_dump()}, indent=2))
    tmp.replace(path)
    return path


def load_run_config(run_path: Path) -> tuple[str, RunConfig]:
    path = run_path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_path} is not a run directory (no config.json)")
    raw = json.loads(path.read_text())
    return raw.pop("run_id"), RunConfig(**raw)
