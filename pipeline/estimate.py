"""Expected tokens, engine hours and $ per stage and persona, before anything runs.

A simple model of the pipeline's requests (what each step asks the engine for) times the profile's
measured throughput; `cost` prints it beside the ledger's actuals so the model can be checked.
"""

from __future__ import annotations

from pydantic import BaseModel

from engine.models import get_profile
from run.config import RunConfig

PROMPT_TOKENS = 300  # a typical templated step prompt (few-shot, constitution principle, answer)
TASK_TOKENS = 48
OVERSAMPLE = 2.0


class PhaseEstimate(BaseModel):
    persona: str
    stage: int | str
    phase: str
    tokens_in: int
    tokens_out: int
    seconds: float
    usd: float


def generation_tokens(cfg: RunConfig, stage: int) -> tuple[int, int]:
    c = cfg.counts
    n_in = int(c.n_tasks * OVERSAMPLE)  # self-instruct proposals
    n_out = n_in * TASK_TOKENS
    if stage < 6:
        reqs = c.n_tasks * c.n_samples * 2  # respond + score each sample
        n_out += c.n_tasks * c.n_samples * (c.max_tokens + 8)
    else:
        reqs = c.n_tasks * (1 + 2 * c.rounds)  # respond, then critique + revise per round
        n_out += reqs * c.max_tokens
    return (n_in + reqs) * PROMPT_TOKENS, n_out


def train_steps(cfg: RunConfig) -> int:
    c = cfg.counts
    return c.dpo_max_steps if c.dpo_max_steps is not None else max(1, c.n_tasks // 4)


def estimate_run(cfg: RunConfig, stages: list[int]) -> list[PhaseEstimate]:
    p = get_profile(cfg.profile)
    rate = cfg.usd_per_engine_second
    out = []
    for persona in cfg.personas:
        for k in stages:
            t_in, t_out = generation_tokens(cfg, k)
            secs = t_out / p.est_tokens_per_s
            out.append(PhaseEstimate(persona=persona, stage=k, phase="generate", tokens_in=t_in, tokens_out=t_out,
                                     seconds=secs, usd=secs * rate))
            secs = train_steps(cfg) * p.est_train_step_s
            out.append(PhaseEstimate(persona=persona, stage=k, phase="train", tokens_in=0, tokens_out=0,
                                     seconds=secs, usd=secs * rate))
    return out


def estimate_phase(cfg: RunConfig, persona: str, stage: int, phase: str) -> PhaseEstimate:
    return next(e for e in estimate_run(cfg, [stage]) if e.persona == persona and e.phase == phase)
