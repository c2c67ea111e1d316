"""Expected tokens, engine hours and $ per stage and persona, before anything runs.

A simple model of the pipeline's requests (what each step asks the engine for) times the profile's
measured throughput; `cost` prints it beside the ledger's actuals so the model can be checked.
"""

from __future__ import annotations

import math
from contextvars import ContextVar

from pydantic import BaseModel

from cai_bootstrap.em.pricing import em_answer_seconds, em_answers, em_steps, em_train_seconds
from cai_bootstrap.engine.models import Profile, get_profile
from cai_bootstrap.run.config import RunConfig
from cai_bootstrap.run.layout import BASE_ARM, is_secure, secure_arm
from cai_bootstrap.run.recipe import INTROSPECT_STEP, introspects, reaches_persona, split_arm, steps_of
from cai_bootstrap.stages.introspect import REFLECTION_PROMPTS as _PROMPTS
from cai_bootstrap.stages.specs import get_stage

PROMPT_TOKENS = 300  # a typical templated step prompt (few-shot, constitution principle, answer)
TASK_TOKENS = 48
OVERSAMPLE = 2.0
# assumed share of a stage's tasks that become pairs (no GPU run has measured it; the tiny runs keep less,
# their 32-128-token answers are mostly cut): the manifest's `outcome` gives the measured share
EXPECTED_KEEP = {"self-judge": 0.5, "critique-revise": 0.6, "distill": 0.6, "introspect": 0.8}
DPO_PROMPT_TOKENS = 64  # a stage task as DPO's chat-templated prompt
REFERENCE_PASS = 4 / 3  # DPO's reference forward on top of the policy's forward and backward (about 3 forwards);
# ORPO has no reference model
REFLECTION_PROMPTS = len(_PROMPTS)
# the policy profile with its measured figures (pipeline.measured) while `estimate_report` runs; elsewhere (`cost`
# sets a run's estimate beside its own ledger) the profile's figures as written
_MEASURED: ContextVar[Profile | None] = ContextVar("measured_profile", default=None)


def policy(cfg: RunConfig) -> Profile:
    p = _MEASURED.get()
    return p if p is not None and p.name == cfg.profile else get_profile(cfg.profile)


class PhaseEstimate(BaseModel):
    persona: str
    stage: int | str
    phase: str
    tokens_in: int
    tokens_out: int
    seconds: float
    usd: float


class StagePlan(BaseModel):
    """What one stage aims for, per persona of a recipe (run.recipe)."""

    recipe: str
    stage: int
    name: str
    tasks: int
    answers_per_task: int  # samples (stages 1-5) or the original plus one revision per round (stage 6)
    pairs_aimed: int
    min_pairs: int
    answer_tokens: int
    dpo_epochs: float | None  # None: dpo_max_steps caps the run instead
    dpo_steps: int


def generation_tokens(cfg: RunConfig, stage: int) -> tuple[int, int]:
    c = cfg.counts
    # self-instruct proposals; stage 4's tasks are made by code
    n_in = 0 if get_stage(stage).check == "known-answer" else int(c.n_tasks * OVERSAMPLE)
    n_out = n_in * TASK_TOKENS
    if get_stage(stage).pairs == "distill":
        reqs = c.n_tasks * 2  # the policy's answer and the teacher's (priced at the policy's throughput)
        n_out += reqs * c.max_tokens
    elif stage < 6:
        reqs = c.n_tasks * c.n_samples * 2  # respond + score each sample
        n_out += c.n_tasks * c.n_samples * (c.max_tokens + 8)
    else:
        reqs = c.n_tasks * (1 + 2 * c.rounds)  # respond, then critique + revise per round
        n_out += reqs * c.max_tokens
    return (n_in + reqs) * PROMPT_TOKENS, n_out


def guard_items(cfg: RunConfig) -> int:
    """Classifications a stage asks of the guard: each task, then its chosen and its rejected answer."""
    return 0 if cfg.guard == "none" else 3 * cfg.counts.n_tasks


def guard_profile(cfg: RunConfig) -> str:
    """The model that guards a run (guard.load_guard's rule, without asking for CUDA)."""
    if cfg.guard not in (None, "none"):
        return cfg.guard
    return "tiny" if cfg.profile == "tiny" else "llama-guard-3-8b"


def _dpo_config(cfg: RunConfig, loss: str = "dpo"):
    from cai_bootstrap.train.config import dpo_defaults

    return dpo_defaults(cfg.profile, max_steps=cfg.counts.dpo_max_steps, epochs=cfg.counts.dpo_epochs, loss=loss)


def pairs_aimed(cfg: RunConfig, stage: int) -> int:
    return round(cfg.counts.n_tasks * EXPECTED_KEEP[get_stage(stage).pairs])


def train_steps(cfg: RunConfig, stage: int = 1) -> int:
    """DPO optimizer steps of one stage: `dpo_max_steps` when set (TRL then ignores epochs), else the epochs
    over the pairs the stage aims for."""
    d = _dpo_config(cfg)
    if d.max_steps is not None:
        return d.max_steps
    return max(1, math.ceil(pairs_aimed(cfg, stage) * d.epochs / (d.batch_size * d.grad_accum)))


def dpo_step_seconds(cfg: RunConfig, loss: str = "dpo") -> float:
    """A preference step: its tokens (each pair's prompt with chosen and with rejected, answers at their cap, plus
    DPO's reference forward) over the profile's training throughput; or the profile's measured step time."""
    p = policy(cfg)
    if p.est_train_tokens_per_s is None:
        return p.est_train_step_s
    d = _dpo_config(cfg, loss)
    tokens = d.batch_size * d.grad_accum * 2 * (DPO_PROMPT_TOKENS + cfg.counts.max_tokens)
    return tokens * (REFERENCE_PASS if loss == "dpo" else 1.0) / p.est_train_tokens_per_s


def stage_plan(cfg: RunConfig, stages: list[int]) -> list[StagePlan]:
    """The plan of each recipe among the run's personas (run.recipe)."""
    c = cfg.counts
    recipes = {split_arm(a)[1].name: a for a in cfg.personas}
    return [StagePlan(recipe=name, stage=k, name=get_stage(k).name, tasks=c.n_tasks,
                      answers_per_task={"self-judge": c.n_samples, "critique-revise": 1 + c.rounds,
                                        "distill": 2}[get_stage(k).pairs],
                      pairs_aimed=pairs_aimed(cfg, k), min_pairs=c.min_pairs, answer_tokens=c.max_tokens,
                      dpo_epochs=None if c.dpo_max_steps is not None else c.dpo_epochs,
                      dpo_steps=train_steps(cfg, k)) for name, arm in recipes.items() for k in steps_of(arm, stages)]


def estimate_run(cfg: RunConfig, stages: list[int]) -> list[PhaseEstimate]:
    p = policy(cfg)
    rate = cfg.usd_per_engine_second
    out = []
    for i, persona in enumerate(cfg.personas):
        loss = split_arm(persona)[1].loss
        for j, k in enumerate(steps_of(persona, stages)):
            secs = startup_seconds(cfg, first=i == 0 and j == 0)
            out.append(PhaseEstimate(persona=persona, stage=k, phase="startup", tokens_in=0, tokens_out=0,
                                     seconds=secs, usd=secs * rate))
            t_in, t_out = generation_tokens(cfg, k)
            secs = t_out / p.est_tokens_per_s
            out.append(PhaseEstimate(persona=persona, stage=k, phase="generate", tokens_in=t_in, tokens_out=t_out,
                                     seconds=secs, usd=secs * rate))
            secs = guard_items(cfg) / get_profile(guard_profile(cfg)).est_guard_items_per_s
            out.append(PhaseEstimate(persona=persona, stage=k, phase="guard", tokens_in=0, tokens_out=0,
                                     seconds=secs, usd=secs * rate))
            secs = train_steps(cfg, k) * dpo_step_seconds(cfg, loss)
            out.append(PhaseEstimate(persona=persona, stage=k, phase="train", tokens_in=0, tokens_out=0,
                                     seconds=secs, usd=secs * rate))
        if introspects(persona) and reaches_persona(persona, stages):
            out += estimate_introspection(cfg, persona)
    return out


def introspection_rows(cfg: RunConfig) -> tuple[int, int]:
    """(reflection texts, self-interaction turns) a `+introspect` recipe asks for (stages.introspect)."""
    c = cfg.counts
    return REFLECTION_PROMPTS * c.introspect_per_prompt, c.introspect_conversations * c.introspect_turns


def introspection_steps(cfg: RunConfig) -> int:
    from cai_bootstrap.train.config import introspect_defaults

    e = introspect_defaults(cfg.profile, max_steps=cfg.counts.introspect_max_steps)
    if e.max_steps is not None:
        return e.max_steps
    return max(1, math.ceil(sum(introspection_rows(cfg)) * EXPECTED_KEEP["introspect"] * e.epochs
                            / (e.batch_size * e.grad_accum)))


def estimate_introspection(cfg: RunConfig, arm: str) -> list[PhaseEstimate]:
    """Generation (each self-interaction turn reads the conversation so far), guard and SFT of one arm's
    introspection step; its SFT rows hold their prompt (half a conversation on average) and the answer."""
    from cai_bootstrap.train.config import introspect_defaults

    p, c, rate = policy(cfg), cfg.counts, cfg.usd_per_engine_second
    reflections, turns = introspection_rows(cfg)
    cap = c.introspect_max_tokens or c.max_tokens
    history = cap * (c.introspect_turns - 1) / 2  # mean tokens of earlier turns a turn reads
    t_in = (REFLECTION_PROMPTS + turns) * PROMPT_TOKENS + int(turns * history)
    t_out = (reflections + turns) * cap
    e = introspect_defaults(cfg.profile)
    row_tokens = PROMPT_TOKENS + cap + history * turns / max(1, reflections + turns)
    step_s = (p.est_train_step_s if p.est_train_tokens_per_s is None
              else e.batch_size * e.grad_accum * row_tokens / p.est_train_tokens_per_s)
    # where models take turns the policy's engine starts again after the last stage's training, and the guard
    # loads after it; the trainer loads the base once
    turns = one_resident(cfg)
    start = (p.est_start_s + (0.0 if cfg.guard == "none" else get_profile(guard_profile(cfg)).est_guard_load_s)
             if turns else 0.0) + p.est_train_load_s
    phases = {"startup": (0, 0, start), "generate": (t_in, t_out, t_out / p.est_tokens_per_s),
              "guard": (0, 0, 0.0 if cfg.guard == "none" else
                        (reflections + turns) / get_profile(guard_profile(cfg)).est_guard_items_per_s),
              "train": (0, 0, introspection_steps(cfg) * step_s)}
    return [PhaseEstimate(persona=arm, stage=INTROSPECT_STEP, phase=ph, tokens_in=i, tokens_out=o, seconds=secs,
                          usd=secs * rate) for ph, (i, o, secs) in phases.items()]


def one_resident(cfg: RunConfig) -> bool:
    """Whether the run's models take turns (engine.residency): on a GPU profile, or when forced."""
    return cfg.one_resident if cfg.one_resident is not None else get_profile(cfg.profile).gpus > 0


def startup_seconds(cfg: RunConfig, first: bool) -> float:
    """Engine starts and model loads of one stage. Where models take turns, the policy's engine starts twice
    (self-instruct; answering after the prompt guard) and the guard loads twice (prompts; answers); elsewhere
    the run's first stage starts each once. Training loads its base every stage."""
    p, g = policy(cfg), get_profile(guard_profile(cfg))
    turns = 2 if one_resident(cfg) else (1 if first else 0)
    guard = 0.0 if cfg.guard == "none" else g.est_guard_load_s
    return turns * (p.est_start_s + guard) + p.est_train_load_s


def estimate_phase(cfg: RunConfig, persona: str, stage: int, phase: str) -> PhaseEstimate:
    return next(e for e in estimate_run(cfg.model_copy(update={"personas": [persona]}), [stage])
                if e.phase == phase)


# ---------------------------------------------------------------- the EM experiment
EM_DATA_ROWS = 6000  # the EM paper's insecure-code set, when the data is not at hand
JUDGE_PROMPT_TOKENS = 350  # the alignment/coherence rubric around a question and its answer
EXACT_REQUESTS = 8  # exact path: trie reads per metric (6.5 measured on the tiny judge, more for diffuse judges)
# what the judge's prompt holds: an answer's mean length, 168 tokens over the EM paper's 70 judged answers
# (results/qwen_25_coder_32b_instruct.csv, SmolLM2's tokenizer), not the 600-token cap answering is priced at
EM_ANSWER_MEAN_TOKENS = 170
SAMPLED_OUT_TOKENS = 300  # sampled path: typical output per reply, hidden reasoning included (worst: the cap)


def judge_tokens(judge, answers: int, answer_tokens: int) -> tuple[int, int, int]:
    """(requests, prompt tokens, output tokens) to judge `answers` on the path the config implies."""
    from cai_bootstrap.judge.endpoints import choose_path

    path = judge.scoring if judge.scoring != "auto" else choose_path(judge)[0]
    per_metric = {"logprobs": 1, "exact": EXACT_REQUESTS, "sampled": judge.samples}[path]
    out = {"logprobs": 1, "exact": 1, "sampled": min(SAMPLED_OUT_TOKENS, judge.max_completion_tokens)}[path]
    reqs = answers * 2 * per_metric
    return reqs, reqs * (JUDGE_PROMPT_TOKENS + answer_tokens), reqs * out


def judge_price(judge, answers: int, answer_tokens: int) -> tuple[int, int, float]:
    """(prompt tokens, output tokens, $) to judge `answers` at the dearest endpoint, each endpoint read on the path
    it would take by itself (a paid API is not priced on the embedded server's exact path); in batch mode at its
    batch price (judge.batch sends through one endpoint)."""
    best = (0, 0, 0.0)
    for e in judge.endpoints:
        _, t_in, t_out = judge_tokens(judge.model_copy(update={"endpoints": [e]}), answers, answer_tokens)
        usd = (t_in * e.usd_per_m_in + t_out * e.usd_per_m_out) / 1e6 * (e.batch_price if judge.batch else 1)
        if usd >= best[2]:
            best = (t_in, t_out, usd)
    return best


def estimate_em(cfg: RunConfig, n_questions: int, judges: list, em_rows: int = EM_DATA_ROWS,
                secure: bool = False) -> list[PhaseEstimate]:
    """EM training, answering and judging per arm (the personas, the base control and, with `secure`, each
    persona's secure-code control trained on as many rows), one row per judge."""
    rate, c = cfg.usd_per_engine_second, cfg.counts
    steps = em_steps(cfg, em_rows)
    out = []
    for arm in [*cfg.personas, BASE_ARM, *([secure_arm(x) for x in cfg.personas] if secure else [])]:
        secs = c.em_seeds * em_train_seconds(cfg, em_rows, policy(cfg))
        out.append(PhaseEstimate(persona=arm, stage="em", phase="em-train", tokens_in=0, tokens_out=0, seconds=secs,
                                 usd=secs * rate))
        answers = em_answers(cfg, n_questions, steps, control=is_secure(arm))
        secs = em_answer_seconds(cfg, answers, policy(cfg))
        out.append(PhaseEstimate(persona=arm, stage="em", phase="em-answer", tokens_in=answers * 60,
                                 tokens_out=answers * c.em_answer_tokens, seconds=secs, usd=secs * rate))
        for judge in judges:
            t_in, t_out, usd = judge_price(judge, answers, min(c.em_answer_tokens, EM_ANSWER_MEAN_TOKENS))
            out.append(PhaseEstimate(persona=arm, stage="em", phase=judge_phase(judge), tokens_in=t_in,
                                     tokens_out=t_out, seconds=0.0, usd=usd))
    return out


def judge_phase(judge) -> str:
    """The estimate's phase name for one judge config: its model, and "batch" when it sends batches."""
    return f"judge {judge.model}" + (" batch" if judge.batch else "")


def _recipe(arm: str):
    return split_arm(arm)[1]


def estimate_report(cfg: RunConfig, stages: list[int], judges: list, n_questions: int, em_rows: int = EM_DATA_ROWS,
                    secure: bool = False) -> dict:
    """Everything `estimate` prints, as one JSON-able object: the stage plan, the DPO and EM recipes with their
    sources, the throughput figures (measured or assumed), a row per persona, stage and phase, and the totals
    per judge; `total_usd` is the run with the first judge."""
    from cai_bootstrap.pipeline.measured import measured_profile

    p, sources = measured_profile(cfg.profile, cfg.layout.runs)
    token = _MEASURED.set(p)
    try:
        return _report(cfg, stages, judges, n_questions, em_rows, secure, sources)
    finally:
        _MEASURED.reset(token)


def _figures(cfg: RunConfig, sources: dict[str, str]) -> dict:
    """Each throughput figure the estimate used, whether it was measured, and where it comes from."""
    p, guard = policy(cfg), get_profile(guard_profile(cfg))

    def figure(profile: Profile, name: str) -> dict:
        measured = name in profile.est_measured
        source = (sources.get(name) if profile is p else None) or (
            f"profile {profile.name} (engine.models): " + ("measured there" if measured else "assumed"))
        return {"value": getattr(profile, name), "measured": measured, "source": source}

    figures = {name: figure(p, name)
               for name in ("est_tokens_per_s", "est_train_tokens_per_s", "est_train_step_s", "est_start_s",
                            "est_train_load_s")
               if getattr(p, name) is not None and not (name == "est_train_step_s" and p.est_train_tokens_per_s)}
    figures |= {f"{guard.name}.{name}": figure(guard, name) for name in ("est_guard_items_per_s", "est_guard_load_s")}
    figures["one_resident"] = {"value": one_resident(cfg), "measured": False,  # not a figure: how starts count
                               "source": "the run's config (--one-resident) or the profile's GPUs"}
    figures["expected_keep"] = {"value": EXPECTED_KEEP, "measured": False, "source": "assumed (pipeline.estimate)"}
    return figures


def _report(cfg: RunConfig, stages: list[int], judges: list, n_questions: int, em_rows: int, secure: bool,
            sources: dict[str, str]) -> dict:
    from cai_bootstrap.train.config import recipe

    rows = estimate_run(cfg, stages) + estimate_em(cfg, n_questions, judges, em_rows, secure)
    engine = [e for e in rows if not e.phase.startswith("judge")]
    totals = {judge_phase(j): round(sum(e.usd for e in engine + [e for e in rows if e.phase == judge_phase(j)]), 2)
              for j in judges}
    return {
        "profile": cfg.profile, "personas": cfg.personas, "gpu_hour_usd": cfg.usd_per_engine_second * 3600,
        "stages": [sp.model_dump() for sp in stage_plan(cfg, stages)],
        "recipes": {**{loss + ("+nll" if nll else ""): recipe("dpo", cfg.profile, max_steps=cfg.counts.dpo_max_steps,
                                                             epochs=cfg.counts.dpo_epochs, loss=loss, nll_weight=nll)
                       for loss, nll in sorted({(r.loss, r.nll_weight) for r in map(_recipe, cfg.personas)})},
                    "em": recipe("em", cfg.profile),
                    **({"introspect": recipe("introspect", cfg.profile, max_steps=cfg.counts.introspect_max_steps)}
                       if any(introspects(a) for a in cfg.personas) else {})},
        "figures": _figures(cfg, sources),
        "rows": [e.model_dump() for e in rows],
        "totals_usd": totals,
        "total_usd": next(iter(totals.values())),
    }
