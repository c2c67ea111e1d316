"""The arms answer the EM questions: each seed's final model on every question, its checkpoints and the untrained
model on the curve subset, through the generation cache (a resumed run pays only for what was not committed)."""

from __future__ import annotations

from pathlib import Path

from cai_bootstrap.em.questions import MAIN
from cai_bootstrap.engine.types import Request, Sampling
from cai_bootstrap.run.config import RunConfig
from cai_bootstrap.run.layout import is_secure
from cai_bootstrap.train.stack import served_adapter


def answer_points(cfg: RunConfig, arm: dict, seed: int, questions: list,
                  control: bool = False) -> list[tuple[int, Path | None, list, int]]:
    """(step, EM adapter dir or None, questions, samples) an arm's seed answers at: the final adapter on every
    question; each checkpoint and the untrained model (step 0, seed 0 only: it does not depend on the EM
    seed) on the same curve subset; the untrained model also on every question, for the DiD. A secure
    `control` arm answers at its final adapter only (its untrained model is its persona's)."""
    c = cfg.counts
    subset = [q for q in questions if q.group == MAIN][: c.em_curve_questions]
    points = [(arm["steps"], arm["em"], questions, c.em_samples)]
    if control:
        return points
    points += [(step, d, subset, c.em_curve_samples) for step, d in sorted(arm["checkpoints"].items())
               if step != arm["steps"]]
    if seed == 0:
        points.append((0, None, questions, c.em_samples))
    return points


def answer_questions(cfg: RunConfig, arms: dict[tuple[str, int], dict], questions, engine, cache) -> list[dict]:
    from cai_bootstrap.engine.cache import cached_generate

    c = cfg.counts
    rows: list[dict] = []
    for (name, seed), arm in arms.items():
        for step, em_dir, qs, n in answer_points(cfg, arm, seed, questions, control=is_secure(name)):
            sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=c.em_answer_tokens, n=n, seed=cfg.seed + seed)
            adapter = served_adapter(arm["persona_adapter"], em_dir, cfg.layout.stacked)
            reqs = [Request(messages=([{"role": "system", "content": q.system}] if q.system else [])
                            + [{"role": "user", "content": q.text}]) for q in qs]
            for comp in cached_generate(engine, cache, reqs, sampling, adapter=adapter, template_id="em-answer"):
                q = qs[comp.request_index]
                rows.append({"id": f"{name}/s{seed}/{step}/{q.id}/{comp.sample_index}", "arm": name, "seed": seed,
                             "step": step, "final": step == arm["steps"], "question_id": q.qid, "paraphrase": q.id,
                             "group": q.group, "question": q.text, "answer": comp.text,
                             "finish_reason": comp.finish_reason, "answer_tokens": comp.completion_tokens})
    return rows


def answering_usd(cfg: RunConfig, arms: dict, n_questions: int) -> float:
    """The answering estimate of the arms trained in this invocation; a reused arm's answers are in the
    generation cache (same adapters, same prompts, same seeds)."""
    from cai_bootstrap.em.pricing import em_answer_seconds, em_answers

    fresh = {arm for (arm, _), a in arms.items() if a["trained"]}
    steps = {arm: a["steps"] for (arm, _), a in arms.items()}
    answers = sum(em_answers(cfg, n_questions, steps[arm], control=is_secure(arm)) for arm in fresh)
    return em_answer_seconds(cfg, answers) * cfg.usd_per_engine_second


def answer_arms(cfg: RunConfig, run_id: str, arms: dict[tuple[str, int], dict], questions: list, engine,
                ledger) -> tuple[list[dict], dict]:
    """Every arm's answers, on the caller's engine when given (it stays open) or one of the run's own; the engine
    time this call paid goes to the ledger. Returns the rows and what was generated or reused from the cache."""
    import contextlib

    from cai_bootstrap.engine.cache import GenerationCache
    from cai_bootstrap.engine.factory import make_engine
    from cai_bootstrap.train.stack import served_lora_rank

    rank = served_lora_rank(cfg)  # the largest stacked adapter an arm is answered with
    own = (contextlib.nullcontext(engine) if engine is not None
           else make_engine(cfg.engine, cfg.profile, max_lora_rank=rank, **cfg.ray_args))
    with own as eng, GenerationCache(cfg.layout.generation_cache) as gcache:
        calls0, usage0 = eng.calls, len(eng.usage)  # a shared engine's earlier calls are not this phase's
        rows = answer_questions(cfg, arms, questions, eng, gcache)
        answering = {"requests": gcache.hits + gcache.misses, "generated": gcache.misses, "reused": gcache.hits}
        usage = eng.usage[usage0:]
        secs = sum(u.seconds for u in usage)
        if eng.calls > calls0:
            ledger.record(run=run_id, kind="engine", phase="em-answer", purpose="em-answers", model=cfg.profile,
                          tokens_in=sum(u.tokens_in for u in usage), tokens_out=sum(u.tokens_out for u in usage),
                          seconds=secs, usd=secs * cfg.usd_per_engine_second, estimated=True)
    return rows, answering
