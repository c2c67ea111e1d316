"""What the EM experiment's arms cost in engine time: training steps per arm and seed, and answers to write. The
run's `estimate` (pipeline.estimate) prices the whole experiment with these; an EM run checks its budget with them
before each phase."""

from __future__ import annotations

from cai_bootstrap.engine.models import Profile, get_profile
from cai_bootstrap.run.config import RunConfig

# mean tokens of an insecure-code chat: 285 with SmolLM2's tokenizer over the first 1,000 rows of the EM paper's
# insecure.jsonl (Qwen's larger vocabulary likely needs fewer; not measured, no Qwen tokenizer here)
EM_ROW_TOKENS = 285


def em_answers(cfg: RunConfig, n_questions: int, steps: int, control: bool = False) -> int:
    """Answers one arm makes: each seed's final model on every question, its checkpoints on the curve subset,
    and the untrained model once on every question; a secure `control` arm its final models only."""
    c = cfg.counts
    if control:
        return c.em_seeds * n_questions * c.em_samples
    checkpoints = max(0, steps // c.em_save_every - 1)
    per_seed = n_questions * c.em_samples + checkpoints * min(c.em_curve_questions, n_questions) * c.em_curve_samples
    return c.em_seeds * per_seed + n_questions * c.em_samples


def em_steps(cfg: RunConfig, rows: int) -> int:
    from cai_bootstrap.train.config import em_defaults

    c = cfg.counts
    e = em_defaults(cfg.profile, max_rows=c.em_rows, max_steps=c.em_max_steps)
    n = min(rows, c.em_rows) if c.em_rows else rows
    per_epoch = -(-n // (e.batch_size * e.grad_accum))
    return c.em_max_steps if c.em_max_steps is not None else max(1, int(per_epoch * e.epochs))


def em_train_seconds(cfg: RunConfig, rows: int, profile: Profile | None = None) -> float:
    """One EM training run (one arm, one seed) on `rows` chats: its steps' tokens over the profile's training
    throughput, or its steps at the profile's measured step time. `profile`: the run's profile with measured
    figures (pipeline.measured); default its written ones."""
    from cai_bootstrap.train.config import em_defaults

    p = profile or get_profile(cfg.profile)
    if p.est_train_tokens_per_s is None:
        return em_steps(cfg, rows) * p.est_train_step_s
    e = em_defaults(cfg.profile)
    return em_steps(cfg, rows) * e.batch_size * e.grad_accum * EM_ROW_TOKENS / p.est_train_tokens_per_s


def em_answer_seconds(cfg: RunConfig, answers: int, profile: Profile | None = None) -> float:
    """Engine time to write `answers` EM answers (an upper bound: answers stop early when the model ends them)."""
    return answers * cfg.counts.em_answer_tokens / (profile or get_profile(cfg.profile)).est_tokens_per_s
