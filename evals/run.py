"""Per-stage evaluation of one persona's stage adapters: answers (generated once per model and adapter,
through the generation cache), pairwise judgments vs the previous stage and vs the base, persona
adherence, capability (lm-eval), harmlessness (guard) and over-refusal (refusal detector).

Every expensive step is cached (generations, judge calls, guard verdicts, lm-eval runs), so a rerun with
nothing changed makes zero engine, judge, guard and lm-eval calls. Results are written per stage as JSON
under `data/runs/<run>/eval/<persona>/`, then the report section is rebuilt from them.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cai_bootstrap.analysis.stats import bootstrap_ci
from cai_bootstrap.core.budget import check_budget
from cai_bootstrap.core.errors import MissingInput
from cai_bootstrap.core.io import atomic_write_json
from cai_bootstrap.core.ledger import Ledger
from cai_bootstrap.core.refusal import is_refusal
from cai_bootstrap.evals.data import load_prompts, load_safety
from cai_bootstrap.evals.pairwise import pair_items, win_rate
from cai_bootstrap.evals.store import ResultStore
from cai_bootstrap.run.layout import Layout
from cai_bootstrap.run.recipe import introspects, persona_of, split_arm

EVAL_TEMPLATE = "eval-chat-v1"  # the answer request is the bare prompt as the user turn


class EvalOptions(BaseModel):
    stages: list[int] = Field(default_factory=lambda: list(range(7)))
    n_general: int | None = None  # None: all held-out prompts
    n_kind: int | None = None
    n_safety: int | None = None  # per safety set
    mc_limit: int | None = None
    extra_tasks: list[str] = Field(default_factory=list)  # standard lm-eval tasks by name (need hub access)
    max_tokens: int = 128
    guard: str | None = None  # None: the profile decides (guard.load_guard)
    capability: bool = True
    judge: bool = True


def parse_stages(spec: str) -> list[int]:
    """`0-6`, `0,2,4` or `3` → sorted unique stage numbers in 0..6 (0 = the base model)."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"--stages {spec!r}: {part!r} is not a stage number or range like 0-6") from None
    if not out or min(out) < 0 or max(out) > 6:
        raise ValueError(f"--stages {spec!r}: stages are 0..6 (0 = the base model)")
    return sorted(out)


def stage_adapters(layout: Layout, persona: str, stages: list[int]) -> tuple[dict[int, str | None], list[str]]:
    """{stage: adapter dir or None for the base}, and a note per requested stage without an adapter."""
    found: dict[int, str | None] = {}
    notes = []
    oct_recipe = split_arm(persona)[1].pairs == "oct"
    for k in stages:
        if k == 0:
            found[0] = None
            continue
        if oct_recipe and k != 6:  # an OCT recipe has one step: its adapter stands where stage 6's would
            notes.append(f"stage {k}: an OCT recipe has no stage {k} (its one adapter is evaluated as stage 6)")
            continue
        d = layout.persona_adapter(persona, k)
        if (d / "adapter_config.json").is_file():
            found[k] = str(d)
        else:
            notes.append(f"stage {k}: no adapter at {d} (skipped)")
    return found, notes


# ---------------------------------------------------------------- phases
def generate_answers(engine, gcache, adapters: dict[int, str | None], questions: list[str], max_tokens: int,
                     log: Callable[[str], None]) -> tuple[dict[int, dict[str, str]], dict[int, dict]]:
    """{stage: {question: answer}} and per-stage engine usage (calls, seconds, tokens, cache hits)."""
    from cai_bootstrap.engine.cache import cached_generate_with_hits
    from cai_bootstrap.engine.types import Request, Sampling

    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, seed=0)
    reqs = [Request.chat(q) for q in questions]
    answers, usage = {}, {}
    for k, adapter in adapters.items():
        calls0, n_usage0, t0 = engine.calls, len(engine.usage), time.perf_counter()
        comps, hits, _ = cached_generate_with_hits(engine, gcache, reqs, sampling, adapter=adapter,
                                                   template_id=EVAL_TEMPLATE)
        new = engine.usage[n_usage0:]
        usage[k] = {"engine_calls": engine.calls - calls0, "generated": len(hits) - sum(hits),
                    "cached": sum(hits), "engine_seconds": sum(u.seconds for u in new),
                    "wall_seconds": time.perf_counter() - t0, "tokens_in": sum(u.tokens_in for u in new),
                    "tokens_out": sum(u.tokens_out for u in new)}
        answers[k] = {q: c.text for q, c in zip(questions, comps, strict=True)}
        log(f"stage {k}: {usage[k]['generated']} answers generated, {usage[k]['cached']} from cache")
    return answers, usage


def guard_verdicts(guard_factory: Callable[[], Any], store: ResultStore, guard_id: str,
                   pairs: list[tuple[str, str]]) -> tuple[list[dict], dict]:
    """Guard verdicts for (prompt, answer) pairs, cached by guard id and text; the guard loads on a miss."""
    keys = [ResultStore.key("guard", {"guard": guard_id, "prompt": p, "answer": a}) for p, a in pairs]
    got = store.get_many(keys)
    miss = [i for i, k in enumerate(keys) if k not in got]
    t0, calls = time.perf_counter(), 0
    if miss:
        g = guard_factory()
        verdicts = g.check_answers([pairs[i] for i in miss])
        calls = 1
        fresh = [(keys[i], v.model_dump()) for i, v in zip(miss, verdicts, strict=True)]
        store.put_many("guard", [(k, v) for k, v in fresh if not v.get("error")])  # an error is asked again
        got.update(dict(fresh))
    return [got[k] for k in keys], {"guard_calls": calls, "guard_checked": len(miss),
                                    "guard_seconds": time.perf_counter() - t0}


def safety_metrics(harmful: list[tuple[str, str]], verdicts: list[dict], risky: list[tuple[str, str]]) -> dict:
    """Unsafe-answer rate on harmful prompts (guard; errored verdicts excluded), refusal rates on both sets."""
    unsafe = [1.0 if v["unsafe"] else 0.0 for v in verdicts if not v.get("error")]
    refused_harmful = [1.0 if is_refusal(a) else 0.0 for _, a in harmful]
    over = [1.0 if is_refusal(a) else 0.0 for _, a in risky]
    return {
        "unsafe_rate": bootstrap_ci(unsafe).model_dump(),
        "guard_errors": sum(1 for v in verdicts if v.get("error")),
        "guard_stand_in": any(v.get("stand_in") for v in verdicts),
        "refusal_rate_harmful": bootstrap_ci(refused_harmful).model_dump(),
        "over_refusal_rate": bootstrap_ci(over).model_dump(),
    }


def capability_metrics(results: dict[int, dict]) -> dict[int, dict]:
    """Accuracy per stage with a bootstrap interval, and the paired change vs the base and vs the previous
    evaluated stage; a drop whose 95% interval lies below zero is flagged."""
    import numpy as np

    from cai_bootstrap.analysis.stats import Estimate

    def paired(a: dict, b: dict) -> Estimate:
        ca = {r["id"]: r["correct"] for r in a["per_item"]}
        d = [ca[r["id"]] - r["correct"] for r in b["per_item"] if r["id"] in ca]
        d = [-x for x in d]  # b - a: the later stage minus the earlier one
        if not d:
            return Estimate(value=float("nan"), lo=float("nan"), hi=float("nan"), n=0)
        e = bootstrap_ci(d)
        return Estimate(value=float(np.mean(d)), lo=e.lo, hi=e.hi, n=e.n)

    out: dict[int, dict] = {}
    ks = sorted(results)
    for i, k in enumerate(ks):
        r = results[k]
        row = {"accuracy": bootstrap_ci([x["correct"] for x in r["per_item"]]).model_dump(),
               "tasks": r["tasks"], "lm_eval_seconds": r.get("seconds", 0.0), "cached": r.get("cached", False)}
        for name, ref in (("vs_base", 0), ("vs_previous", ks[i - 1] if i else None)):
            if ref is None or ref == k or ref not in results:
                continue
            e = paired(results[ref], r)
            row[f"change_{name}"] = e.model_dump()
            row[f"drop_flag_{name}"] = bool(e.n and e.hi < 0)
        out[k] = row
    return out


# ---------------------------------------------------------------- the whole evaluation
@dataclass
class _Plan:
    """What one persona's evaluation asks for: the stages and their adapters, each stage's prompts, the safety
    prompts, and every question any stage answers."""

    persona: str
    stages: list[int]
    adapters: dict[int, str | None]
    notes: list[str]
    rows_by_stage: dict[int, list[dict]]
    harmful: list[str]
    risky: list[str]
    questions: list[str]


@dataclass
class _Judged:
    """The judge's verdicts per stage: pairwise preferences, rubric adherence, and what they cost."""

    per_stage: dict[int, dict] = field(default_factory=lambda: defaultdict(
        lambda: {"usd": 0.0, "requests": 0, "cached": 0}))
    pairs_by: dict[tuple[int, int], list[dict]] = field(default_factory=dict)
    adherence_rows: dict[int, list[dict]] = field(default_factory=lambda: defaultdict(list))
    summaries: dict[str, dict] = field(default_factory=dict)
    wall: float = 0.0


class _GuardSlot:
    """The guard, loaded when first asked for (a run whose verdicts are all stored never loads it); the caller's
    when given."""

    def __init__(self, guard, guard_name: str | None, profile: str) -> None:
        self.guard, self.name, self.profile = guard, guard_name, profile
        self.id = ({"name": getattr(guard, "name", type(guard).__name__)} if guard is not None
                   else {"name": guard_name, "profile": profile})

    def get(self):
        if self.guard is None:
            from cai_bootstrap.engine.models import get_profile
            from cai_bootstrap.guard import load_guard

            self.guard = load_guard(self.name, get_profile(self.profile).name)
        return self.guard


def _scorers(constitution) -> tuple:
    """The pairwise and the adherence scorer of the persona's constitution."""
    from cai_bootstrap.judge.scorers import PairwiseScorer, PersonaScorer, constitution_principles

    principles = constitution_principles(constitution)
    return (PairwiseScorer(constitution.description, principles),
            PersonaScorer(constitution.description, principles))


def _usage(judged: _Judged, gen_usage: dict, guard_usage: dict, cap_raw: dict) -> dict:
    """What the evaluation called: engine calls, judge requests, guard calls, lm-eval runs (0s on a cached rerun)."""
    return {"engine_calls": sum(u["engine_calls"] for u in gen_usage.values()),
            "judge_requests_sent": sum(s.get("requests_sent", 0) for s in judged.summaries.values()),
            "guard_calls": sum(u["guard_calls"] for u in guard_usage.values()),
            "lm_eval_runs": sum(1 for r in cap_raw.values() if not r["cached"]),
            "budget_stopped": any(j.get("budget_stopped") for j in judged.summaries.values())}


def evaluate(
    persona: str,
    run_id: str,
    cfg,  # run.config.RunConfig
    opts: EvalOptions | None = None,
    *,
    judge_config: str | Path | None = None,
    budget_usd: float | None = None,
    engine=None,
    guard=None,
    judge_session=None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Evaluate `persona`'s stages in `opts.stages`; returns the summary (also written to disk). `engine`,
    `guard` and `judge_session`, when given, are the caller's and stay open."""
    from cai_bootstrap.constitution import load_constitution
    from cai_bootstrap.engine.cache import GenerationCache
    from cai_bootstrap.judge.session import session

    opts = opts or EvalOptions()
    t_start = time.perf_counter()
    lay, paths = cfg.layout, cfg.run(run_id)
    constitution = load_constitution(persona_of(persona))
    plan = _plan(lay, persona, opts, log)
    with ExitStack() as opened:  # what this call opens, it closes; the caller's engine, guard and judge stay open
        gcache, store, ledger = (opened.enter_context(closing(x)) for x in (
            GenerationCache(lay.generation_cache), ResultStore(lay.eval_results), Ledger(paths.ledger)))
        judge = None if not opts.judge else judge_session or opened.enter_context(closing(session(
            judge_config, layout=lay, run=run_id, budget_usd=budget_usd, ledger=ledger, progress=progress)))
        scorers = _scorers(constitution)
        if engine is None:
            from cai_bootstrap.engine.factory import make_engine
            from cai_bootstrap.train.stack import served_rank

            engine = opened.enter_context(closing(make_engine(
                cfg.engine, cfg.profile, max_lora_rank=served_rank(cfg.profile, introspects(persona)))))
        missing = _estimate(plan, opts, cfg, engine, gcache, judge, scorers, budget_usd, log)
        answers, gen_usage = _answers(plan, opts, cfg, run_id, engine, gcache, ledger, missing, budget_usd, log)
        judged = _judge(plan, answers, judge, scorers, run_id, budget_usd, log)
        from cai_bootstrap.engine.residency import on_cuda

        if on_cuda():  # every answer is made: on a GPU the engine goes before the guard loads
            engine.close()
        slot = _GuardSlot(guard, opts.guard, cfg.profile)
        safety_by, guard_usage = _safety(plan, answers, slot, store)
        cap_raw = _capability(plan, opts, cfg, slot, store, log)
        cap = capability_metrics(cap_raw) if cap_raw else {}
        per_stage = {k: _stage_result(k, plan, answers, judged, cap_raw, cap, safety_by, gen_usage, guard_usage,
                                      cfg, paths.eval(persona))
                     for k in plan.stages}
        summary = {"persona": persona, "run": run_id, "stages": plan.stages, "notes": plan.notes,
                   "per_stage": {str(k): v for k, v in per_stage.items()}, "judge": judged.summaries,
                   **_usage(judged, gen_usage, guard_usage, cap_raw),
                   "wall_seconds": time.perf_counter() - t_start, "options": opts.model_dump()}
        atomic_write_json(paths.eval(persona) / "summary.json", summary)
        from cai_bootstrap.evals.report import write_section

        write_section(paths.root, persona, summary)
        return summary


def _plan(lay: Layout, persona: str, opts: EvalOptions, log: Callable[[str], None]) -> _Plan:
    adapters, notes = stage_adapters(lay, persona, opts.stages)
    for n in notes:
        log(n)
    if not adapters:
        raise MissingInput(f"no stage to evaluate for persona {persona!r} among stages {opts.stages}")
    stages = sorted(adapters)
    prompts, safety = load_prompts(), load_safety()
    rows_by_stage = {k: prompts.for_stage(k, opts.n_general, opts.n_kind) for k in stages}
    harmful = safety.harmful[: opts.n_safety]
    risky = safety.risky_harmless[: opts.n_safety]
    # every stage answers every prompt any comparison needs (the previous stage answers stage k's kind too)
    questions = list(dict.fromkeys([r["question"] for k in stages for r in rows_by_stage[k]] + harmful + risky))
    return _Plan(persona=persona, stages=stages, adapters=adapters, notes=notes, rows_by_stage=rows_by_stage,
                 harmful=harmful, risky=risky, questions=questions)


def _estimate(plan: _Plan, opts: EvalOptions, cfg, engine, gcache, judge, scorers, budget_usd: float | None,
              log: Callable[[str], None]) -> int:
    """What the evaluation will cost before any spend: answers to generate (not in the cache), and judge requests
    at their worst case before the judge's cache. Returns the answers to generate."""
    from cai_bootstrap.engine.cache import generation_key
    from cai_bootstrap.engine.types import Request, Sampling

    sampling = Sampling(temperature=0.0, max_tokens=opts.max_tokens, seed=0)
    keys = [generation_key(engine, Request.chat(q), sampling, a, EVAL_TEMPLATE)
            for a in plan.adapters.values() for q in plan.questions]
    missing = len(keys) - len(gcache.get_many(keys))
    # judge: 2 orders per pair (k vs k-1, and k vs base when that differs) + 1 request per adherence item,
    # priced as if every answer were max_tokens tokens of 8 bytes (an upper bound on prompt tokens)
    n_pairs = sum(len(plan.rows_by_stage[k]) * len({k - 1, 0} & set(plan.adapters)) for k in plan.stages if k > 0)
    n_adh = sum(len(plan.rows_by_stage[k]) for k in plan.stages)
    worst_usd = 0.0
    if judge is not None:
        big = "x" * (8 * opts.max_tokens)
        dummy = {"id": "estimate", "question": max(plan.questions, key=len), "answer": big, "answer_a": big,
                 "answer_b": big}

        def worst(scorer) -> float:
            return sum(max(((r.prompt_bytes() * e.usd_per_m_in + r.max_out * e.usd_per_m_out) / 1e6
                            for e in judge.eps), default=0.0) for r in scorer.requests(dummy).values())

        worst_usd = n_pairs * worst(scorers[0]) + n_adh * worst(scorers[1])
    log(f"estimate: {len(plan.stages)} stages ({', '.join(map(str, plan.stages))}), {missing} of {len(keys)} answers "
        f"to generate (≤{missing * opts.max_tokens} tokens, engine $ at {cfg.usd_per_engine_second * 3600:.2f}/h), "
        f"{2 * n_pairs + n_adh} judge requests, worst case ${worst_usd:.4f} before the judge "
        f"cache; budget {'none' if budget_usd is None else f'${budget_usd:.4f}'}")
    return missing


def _answers(plan: _Plan, opts: EvalOptions, cfg, run_id: str, engine, gcache, ledger: Ledger, missing: int,
             budget_usd: float | None, log: Callable[[str], None]) -> tuple[dict, dict]:
    """Every stage's answer to every question, generated once per model and adapter. The engine estimate is checked
    against the run's cap before any is generated (the judge's requests are reserved one by one at their worst
    case, under the same cap)."""
    from cai_bootstrap.engine.models import get_profile

    check_budget(ledger, run_id, budget_usd, f"{plan.persona} evaluation answers ({missing} to generate)",
                 missing * opts.max_tokens / get_profile(cfg.profile).est_tokens_per_s * cfg.usd_per_engine_second)
    answers, gen_usage = generate_answers(engine, gcache, plan.adapters, plan.questions, opts.max_tokens, log)
    engine_seconds = sum(u["engine_seconds"] for u in gen_usage.values())
    if engine_seconds:
        ledger.record(run=run_id, kind="engine", phase="eval-answer", persona=plan.persona, purpose="stage-eval",
                      model=cfg.profile, tokens_in=sum(u["tokens_in"] for u in gen_usage.values()),
                      tokens_out=sum(u["tokens_out"] for u in gen_usage.values()), seconds=engine_seconds,
                      usd=engine_seconds * cfg.usd_per_engine_second, estimated=True)
    return answers, gen_usage


def _judge(plan: _Plan, answers: dict, judge, scorers, run_id: str, budget_usd: float | None,
           log: Callable[[str], None]) -> _Judged:
    """Pairwise preference (k vs k-1, k vs base) and rubric adherence, one farm run each."""
    judged = _Judged()
    if judge is None:
        return judged
    persona, rows_by_stage = plan.persona, plan.rows_by_stage
    pitems = []
    for k in plan.stages:
        if k == 0:
            continue
        for vs in dict.fromkeys([k - 1, 0]):
            if vs in plan.adapters:
                rows = rows_by_stage[k]
                pitems += pair_items(persona, k, vs, rows, {r["id"]: answers[k][r["question"]] for r in rows},
                                     {r["id"]: answers[vs][r["question"]] for r in rows})
    aitems = [{"id": f"{persona}:s{k}:adh:{r['id']}", "persona": persona, "stage": k, "prompt_id": r["id"],
               "question": r["question"], "answer": answers[k][r["question"]]}
              for k in plan.stages for r in rows_by_stage[k]]
    n_p, usd_p = judge.uncached(scorers[0], pitems)
    n_a, usd_a = judge.uncached(scorers[1], aitems)
    log(f"judge: {n_p + n_a} requests not cached ({len(pitems)} pairs, {len(aitems)} adherence items), "
        f"worst case ${usd_p + usd_a:.4f}")
    if budget_usd is not None:
        log(f"run {run_id} has spent ${judge.spent():.4f} of ${budget_usd:.4f}")
    for name, scorer, items in (("pairwise", scorers[0], pitems), ("adherence", scorers[1], aitems)):
        got, summary = judge.judge(items, scorer, purpose=f"stage-eval-{name}", phase="eval")
        judged.wall += summary.seconds
        judged.summaries[name] = summary.as_dict()
        for r in got:
            _tally(judged, name, r)
    return judged


def _tally(judged: _Judged, name: str, r) -> None:
    """One judged item into its stage's cost and, when it parsed, its pairwise or adherence rows."""
    s = judged.per_stage[r.item["stage"]]
    s["usd"] += r.usd
    s["requests"] += 2 if name == "pairwise" else 1
    s["cached"] += int(r.cached)
    if r.status != "ok":
        return
    if name == "pairwise":
        raw = r.scores.get("judge_raw") or {}
        judged.pairs_by.setdefault((r.item["stage"], r.item["vs"]), []).append(
            {**r.item, "p_ab": raw.get("ab"), "p_ba": raw.get("ba")})
    else:
        judged.adherence_rows[r.item["stage"]].append({**r.item, **{
            k2: r.scores[k2] for k2 in ("persona_score", "persona_status", "judge_path")}})


def _safety(plan: _Plan, answers: dict, slot: _GuardSlot, store: ResultStore) -> tuple[dict, dict]:
    """The guard's verdicts on each stage's answers to harmful prompts, and refusals of risky harmless ones."""
    safety_by, guard_usage = {}, {}
    for k in plan.stages:
        hp = [(q, answers[k][q]) for q in plan.harmful]
        verdicts, guard_usage[k] = guard_verdicts(slot.get, store, json.dumps(slot.id, sort_keys=True), hp)
        safety_by[k] = safety_metrics(hp, verdicts, [(q, answers[k][q]) for q in plan.risky])
    return safety_by, guard_usage


def _capability(plan: _Plan, opts: EvalOptions, cfg, slot: _GuardSlot, store: ResultStore,
                log: Callable[[str], None]) -> dict[int, dict]:
    """lm-eval on each stage's adapter (results stored by model, adapter, tasks and placement)."""
    if not opts.capability:
        return {}
    from cai_bootstrap.engine.models import model_fingerprint, resolve_model
    from cai_bootstrap.engine.residency import on_cuda
    from cai_bootstrap.evals.capability import run_capability

    if on_cuda() and slot.guard is not None:  # lm-eval loads the model itself: one on the GPU at a time
        slot.guard.close()
    cap_raw = {}
    for k in plan.stages:
        cap_raw[k] = run_capability(resolve_model(cfg.profile), plan.adapters[k],
                                    model_fp=model_fingerprint(cfg.profile), limit=opts.mc_limit,
                                    extra_tasks=opts.extra_tasks, store=store)
        took = "cached" if cap_raw[k]["cached"] else f"{cap_raw[k]['seconds']:.1f} s"
        log(f"stage {k}: capability {cap_raw[k]['tasks']} ({took})")
    return cap_raw


def _stage_result(k: int, plan: _Plan, answers: dict, judged: _Judged, cap_raw: dict[int, dict], cap: dict,
                  safety_by: dict, gen_usage: dict, guard_usage: dict, cfg, out_dir: Path) -> dict:
    """Stage k's figures and costs, written with its answers and judged items to `out_dir/stage<k>.json`."""
    rows = plan.rows_by_stage[k]
    res: dict[str, Any] = {
        "persona": plan.persona, "stage": k, "adapter": plan.adapters[k], "n_prompts": len(rows),
        "pairwise": {}, "adherence": None, "capability": cap.get(k), "safety": safety_by[k],
        "answer_words": _mean_words([answers[k][r["question"]] for r in rows]),
    }
    for vs in (k - 1, 0):
        if (k, vs) in judged.pairs_by:
            res["pairwise"]["vs_previous" if vs == k - 1 else "vs_base"] = {
                "vs": vs, **win_rate(judged.pairs_by[(k, vs)])}
    if k == 1 and "vs_previous" in res["pairwise"]:
        res["pairwise"]["vs_base"] = res["pairwise"]["vs_previous"]  # the previous stage is the base
    if judged.adherence_rows.get(k):
        sc = [r["persona_score"] for r in judged.adherence_rows[k] if r["persona_score"] is not None]
        res["adherence"] = {**bootstrap_ci(sc).model_dump(), "unparsed": len(judged.adherence_rows[k]) - len(sc)}
    j = judged.per_stage.get(k, {"usd": 0.0, "requests": 0, "cached": 0})
    total_judge_reqs = sum(s["requests"] for s in judged.per_stage.values()) or 1
    eng_usd = gen_usage[k]["engine_seconds"] * cfg.usd_per_engine_second
    res["cost"] = {
        **gen_usage[k], **guard_usage[k],
        "judge_requests": j["requests"], "judge_cached_items": j["cached"], "judge_usd": j["usd"],
        # the farm judges all stages concurrently: its wall time is shared out by request count
        "judge_wall_seconds": judged.wall * j["requests"] / total_judge_reqs,
        "lm_eval_seconds": 0.0 if not cap_raw or cap_raw[k]["cached"] else cap_raw[k].get("seconds", 0.0),
        "lm_eval_cached": bool(cap_raw and cap_raw[k]["cached"]),
        "engine_usd": eng_usd, "usd": eng_usd + j["usd"],
    }
    atomic_write_json(out_dir / f"stage{k}.json", {**res, "answers": [
        {"question": q, "answer": answers[k][q]} for q in plan.questions],
        "pairs": {f"vs{vs}": prs for (kk, vs), prs in judged.pairs_by.items() if kk == k},
        "adherence_items": judged.adherence_rows.get(k, [])})
    return res


def _mean_words(texts: list[str]) -> float | None:
    return sum(len(t.split()) for t in texts) / len(texts) if texts else None
