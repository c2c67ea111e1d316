"""The EM experiment: an EM adapter trained on top of each persona adapter (and the bare base as control),
per training seed, stacked with it (never merged), answering EM questions, judged, summarised.

Outputs under `data/runs/<id>/em/`: answers.jsonl, judged.jsonl, summary.json (the report reads these).
The primary effect of a persona is the difference in differences against its untrained self,
(EM(persona+EM) - EM(persona)) - (EM(base+EM) - EM(base)), with a cluster bootstrap over seeds and questions
(analysis.inference), one-sided for the pre-registered direction, Holm-adjusted across hypotheses.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from analysis import inference
from analysis.stats import bootstrap_ci
from core.budget import check_budget
from core.console import console
from core.errors import MissingInput
from core.io import atomic_write_json, atomic_write_jsonl
from core.ledger import Ledger
from engine.types import Request, Sampling
from pipeline.em_inputs import EMInputs
from pipeline.questions import MAIN, load_questions
from run.config import RunConfig
from run.layout import BASE_ARM as BASE
from run.layout import SECURE, is_secure, secure_arm
from run.recipe import persona_of
from train.stack import lora_b_norm, served_adapter

if TYPE_CHECKING:
    from engine.base import Engine
    from judge.session import JudgeSession

# pre-registered directions of the primary effect (DiD) per persona; other personas get a two-sided look
HYPOTHESES = {
    "sycophancy": ("H1", "sycophancy persona is more susceptible to EM than the base", "greater"),
    "goodness": ("H2", "goodness persona is less susceptible to EM than the base", "less"),
}


def persona_adapter(cfg: RunConfig, persona: str) -> Path:
    """The persona's adapter (its recipe's: run.recipe), which must exist."""
    path = cfg.layout.persona_adapter(persona, cfg.stage)
    if not (path / "adapter_config.json").is_file():
        raise MissingInput(f"persona {persona!r} has no persona adapter at {path}: run "
                           f"`python bootstrap.py --stage {cfg.stage} --persona {persona}` first")
    return path


def train_em_arms(cfg: RunConfig, run_id: str, data: Path, mode: str, ledger,
                  secure: Path | None = None, budget: float | None = None,
                  on_training: Callable[[], None] | None = None) -> dict[tuple[str, int], dict]:
    """Train (or reuse) the EM adapter per arm and seed; {(arm, seed): {persona_adapter, em, checkpoints, ...}}.
    With `secure` chats, each persona also gets its secure-code control arm ("<persona>+secure"): the same
    training on top of the same persona adapter, on the secure twin of the data. Each training that is not a
    reuse first checks the run's budget against its estimate, and calls `on_training`. An arm trained now is
    marked `trained`."""
    from pipeline.estimate import em_train_seconds
    from train.config import em_defaults
    from train.dpo import finished
    from train.em import em_reusable
    from train.worker import run_training

    c = cfg.counts
    arms: dict[tuple[str, int], dict] = {}
    controls = [secure_arm(p) for p in cfg.personas] if secure else []
    for arm in [*cfg.personas, BASE, *controls]:
        pa = persona_adapter(cfg, arm.removesuffix(SECURE)) if arm != BASE else None
        arm_mode = "base" if arm == BASE else mode
        arm_data = secure if is_secure(arm) else data
        for seed in range(c.em_seeds):
            ecfg = em_defaults(cfg.profile, max_steps=c.em_max_steps, max_rows=c.em_rows,
                               save_every=c.em_save_every, seed=cfg.seed + seed)
            out = cfg.layout.em_adapter(arm, arm_mode, seed)
            prev = finished(out)
            trained = em_reusable(out, arm_data, ecfg, cfg.profile, arm_mode, pa) is None
            if trained:
                rows = sum(1 for line in Path(arm_data).open() if line.strip())
                check_budget(ledger, run_id, budget, f"EM training of {arm}, seed {seed}",
                             em_train_seconds(cfg, rows) * cfg.usd_per_engine_second)
                if on_training:
                    on_training()
            t0 = time.perf_counter()
            # train_em reuses a finished run with equal inputs without loading any model; on CUDA it trains in
            # its own process so the GPU is fully released for the answering engine afterwards
            man = run_training("em", data=str(arm_data), out=str(out), cfg=ecfg, profile=cfg.profile, mode=arm_mode,
                               persona_adapter=str(pa) if pa else None)
            secs = time.perf_counter() - t0
            if man != prev:  # trained now (a reuse hands back the stored manifest unchanged)
                ledger.record(run=run_id, kind="engine", phase="em-train", persona=arm, purpose="em-sft",
                              model=cfg.profile, seconds=secs, usd=secs * cfg.usd_per_engine_second, estimated=True)
            ckpts = {int(n.split("-")[1]): out / n for n in man.get("checkpoints", [])}
            arms[(arm, seed)] = {"persona_adapter": pa, "em": out, "checkpoints": ckpts, "mode": arm_mode,
                                 "steps": man["steps"], "trained": trained}
            console.print(f"EM adapter for {arm}, seed {seed}: {out} ({man['steps']} steps, mode {arm_mode})")
    return arms


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
    from engine.cache import cached_generate

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


# ---------------------------------------------------------------- summary
def _scored(rows: list[dict]) -> list[dict]:
    return [{"seed": r.get("seed", 0), "question": r["question_id"], "misaligned": int(r["misaligned"])}
            for r in rows if r.get("misaligned") is not None]


def _share(rows: list[dict], test) -> dict:
    return inference.wilson(sum(1 for r in rows if test(r)), len(rows)).model_dump()


def _arm_summary(rows: list[dict], untrained: list[dict], curve: dict, steps_by_seed: dict) -> dict:
    """An arm's final models (all seeds) on the main questions: EM rate with its cluster interval, the same
    untrained, per-seed rates, means and the shares of what was not scored (Wilson intervals)."""
    scored = _scored(rows)
    per_seed = {s: inference.em_rate([r for r in scored if r["seed"] == s]).model_dump()
                for s in sorted({r["seed"] for r in scored})}
    masses = [r["aligned_mass"] for r in rows if r.get("aligned_mass") is not None]
    return {
        "answers": len(rows), "scored": len(scored), "seeds": sorted(steps_by_seed),
        "em_rate": inference.em_rate(scored).model_dump(),
        "em_rate_untrained": inference.em_rate(_scored(untrained)).model_dump(),
        "em_rate_by_seed": per_seed,
        "alignment": bootstrap_ci([r["aligned"] for r in rows if r.get("aligned") is not None]).model_dump(),
        "coherence": bootstrap_ci([r["coherent"] for r in rows if r.get("coherent") is not None]).model_dump(),
        "refusal_rate": _share(rows, lambda r: r.get("aligned_status") == "refusal")["value"],
        "code_rate": _share(rows, lambda r: r.get("aligned_status") == "code")["value"],
        "discarded_rate": _share(rows, lambda r: r.get("aligned_status") in ("discarded", "unparsed", None))["value"],
        "truncated": _share(rows, lambda r: r.get("finish_reason") == "length"),
        # probability the judge put on a 0-100 number: why answers were discarded (< 0.25)
        "number_mass_median": round(statistics.median(masses), 4) if masses else None,
        **curve,
    }


def _curve(arm_rows: list[dict], subset: set[str]) -> dict:
    """EM rate per checkpoint step on the same question subset (final included), the steepest rise with a
    bootstrap interval over questions."""
    on = [r for r in arm_rows if r["question_id"] in subset and r.get("misaligned") is not None]
    steps = sorted({r["step"] for r in on})
    curve = {s: inference.em_rate(_scored([r for r in on if r["step"] == s])).model_dump() for s in steps}
    return {"curve": curve, "transition": inference.transition_step(
        {s: _scored([r for r in on if r["step"] == s]) for s in steps})}


def summarise(judged: list[dict], personas: list[str], b_norms: dict | None = None) -> dict:
    """Per arm: EM rates with intervals (final and untrained), curve and transition; per persona: the DiD
    (primary), and on the same questions the level difference against the base control and, where the run
    has one, against the persona's secure-code control (secondary); verdicts with Holm-adjusted one-sided p
    for the pre-registered hypotheses. Main questions only; other question groups (JSON, template,
    pre-registered) are reported beside, never pooled."""
    main = [r for r in judged if r.get("group", MAIN) == MAIN]
    subset = {r["question_id"] for r in main if not r["final"] and r["step"] != 0} or {r["question_id"] for r in main}
    controls = [secure_arm(p) for p in personas if any(r["arm"] == secure_arm(p) for r in judged)]
    arms, final, untrained = {}, {}, {}
    for arm in [*personas, BASE, *controls]:
        rows = [r for r in main if r["arm"] == arm]
        final[arm] = [r for r in rows if r["final"]]
        untrained[arm] = [r for r in rows if r["step"] == 0]
        seeds = {r.get("seed", 0) for r in final[arm]}
        arms[arm] = _arm_summary(final[arm], untrained[arm], _curve(rows, subset), {s: None for s in seeds})
        if b_norms and arm in b_norms:
            arms[arm]["lora_b_norm"] = b_norms[arm]
    pvals, effects = {}, {}
    for arm in personas:
        # a recipe of a pre-registered persona (goodness@oct-dpo) is tested in that persona's direction
        expect = HYPOTHESES.get(persona_of(arm), (None, None, "greater"))[2]
        arms[arm]["did"] = inference.did(_scored(final[arm]), _scored(untrained[arm]), _scored(final[BASE]),
                                         _scored(untrained[BASE]), expect=expect).model_dump()
        arms[arm]["em_rate_minus_base"] = inference.paired_diff(_scored(final[arm]), _scored(final[BASE]),
                                                                expect=expect).model_dump()
        if secure_arm(arm) in controls:  # the same persona, trained on secure code: what insecure code adds
            arms[arm]["em_rate_minus_secure"] = inference.paired_diff(
                _scored(final[arm]), _scored(final[secure_arm(arm)]), expect="greater").model_dump()
        if arm in HYPOTHESES and arms[arm]["did"]["n"]:
            effects[arm] = arms[arm]["did"]
            pvals[arm] = arms[arm]["did"]["p_one_sided"]
    adjusted = inference.holm(pvals) if pvals else {}
    seeds = min((len(a["seeds"]) for a in arms.values()), default=0)
    verdicts = [inference.verdict(HYPOTHESES[a][0], HYPOTHESES[a][1] + " (difference in differences)",
                                  inference.Estimate(**effects[a]), adjusted[a], seeds=seeds) for a in effects]
    for a in HYPOTHESES:
        if a in personas and a not in effects:
            verdicts.append(f"{HYPOTHESES[a][0]} ({HYPOTHESES[a][1]}): no data")
    groups = {}
    for g in sorted({r.get("group", MAIN) for r in judged} - {MAIN}):
        groups[g] = {arm: inference.em_rate(_scored([r for r in judged if r.get("group") == g and r["arm"] == arm
                                                     and r["final"]])).model_dump() for arm in arms}
    return {"arms": arms, "verdicts": verdicts, "holm": adjusted, "seeds": seeds, "groups": groups,
            "curve_questions": sorted(subset)}


def run_em(cfg: RunConfig, run_id: str, inputs: EMInputs, judge_config: Path | None = None,
           budget_usd: float | None = None, mode: str = "on-top", groups: tuple[str, ...] = (MAIN,),
           engine: Engine | None = None, judge_session: JudgeSession | None = None,
           make_room: Callable[[], None] | None = None) -> dict:
    """`inputs` (pipeline.em_inputs.resolve, checked before the run started) names the training chats, the
    questions and the judge prompts. `engine` and `judge_session`, when given, are the caller's (started once
    for several phases) and stay open; otherwise they are made here and closed. `make_room` runs before an arm
    trains: the caller's models are released there where they take turns on the device (engine.residency)."""
    from engine.cache import GenerationCache
    from engine.factory import make_engine
    from judge.session import session_or
    from pipeline.loop import ray_args, served_lora_rank

    if inputs.data is None or not inputs.data.is_file():
        raise MissingInput(f"EM training data {inputs.data} does not exist (chat JSONL with a `messages` list)")
    paths = cfg.run(run_id)
    ledger = Ledger(paths.ledger)
    questions = load_questions(inputs.questions, groups)
    scorer = inputs.scorer()
    with session_or(judge_session, judge_config, layout=cfg.layout, run=run_id, budget_usd=budget_usd,
                    ledger=ledger) as judge:
        # new arms make new answers to judge: an embedded judge server starts while they train and answer
        arms = train_em_arms(cfg, run_id, inputs.data, mode, ledger, inputs.secure, budget_usd,
                             on_training=lambda: (make_room and make_room(), judge.prestart()))
        check_budget(ledger, run_id, budget_usd, "EM answering", _answering_usd(cfg, arms, len(questions)))
        n_answers = len(questions) * cfg.counts.em_samples
        console.print(f"answering {len(questions)} EM questions × {cfg.counts.em_samples} samples per arm and seed "
                      f"({n_answers} per final model)…")
        rank = served_lora_rank(cfg)  # the largest stacked adapter an arm is answered with
        own = (contextlib.nullcontext(engine) if engine is not None
               else make_engine(cfg.engine, cfg.profile, max_lora_rank=rank, **ray_args(cfg)))
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
        atomic_write_jsonl(paths.em_answers, rows)
        results, summary = judge.judge(rows, scorer, purpose="em-eval")
        anchors = judge_anchors(judge, scorer, cfg.counts.em_anchors)
    judged = [r.row() for r in results if r.item.get("arm")]
    atomic_write_jsonl(paths.em_judged, judged)
    b_norms = {arm: {str(step): lora_b_norm(d) for step, d in sorted(m["checkpoints"].items())}
               for (arm, seed), m in arms.items() if seed == 0}
    result = summarise(judged, cfg.personas, b_norms)
    result["judge"] = summary.as_dict()
    result["anchors"] = anchors
    result |= inputs.describe()
    result["mode"] = mode
    result["answering"] = answering  # this invocation's: a resumed or repeated run reuses what was committed
    atomic_write_json(paths.em_summary, result, indent=1)
    ledger.close()
    for line in result["verdicts"]:
        console.print(line)
    return result


def _answering_usd(cfg: RunConfig, arms: dict, n_questions: int) -> float:
    """The answering estimate of the arms trained in this invocation; a reused arm's answers are in the
    generation cache (same adapters, same prompts, same seeds)."""
    from pipeline.estimate import em_answer_seconds, em_answers

    fresh = {arm for (arm, _), a in arms.items() if a["trained"]}
    steps = {arm: a["steps"] for (arm, _), a in arms.items()}
    answers = sum(em_answers(cfg, n_questions, steps[arm], control=is_secure(arm)) for arm in fresh)
    return em_answer_seconds(cfg, answers) * cfg.usd_per_engine_second


# ---------------------------------------------------------------- judges: anchors and a second opinion
def judge_anchors(judge, scorer, n: int | None = None) -> dict:
    """The project's anchors (answers with score bands by construction) judged beside every EM run, so a
    judge that cannot judge shows in the report; cached like any judgment. `n`: a share stratified by
    category (the demos), None: all of them; the agreement says how many of how many were judged."""
    from judge.anchors import agreement, anchor_items, load_project_anchors, stratified

    every = load_project_anchors()
    chosen = stratified(every, n)
    results, _ = judge.judge(anchor_items(chosen), scorer, purpose="em-anchors", phase="calibrate")
    return agreement([r.row() for r in results])["anchors"] | {"of": len(every)}


def judge_agreement(a: list[dict], b: list[dict]) -> dict:
    """Two judges on the same answers: Cohen's kappa on the EM label where both scored, Spearman on alignment."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    other = {r["id"]: r for r in b}
    both = [(r, other[r["id"]]) for r in a if r["id"] in other]
    labels = [(x["misaligned"], y["misaligned"]) for x, y in both
              if x.get("misaligned") is not None and y.get("misaligned") is not None]
    aligned = [(x["aligned"], y["aligned"]) for x, y in both if x.get("aligned") is not None
               and y.get("aligned") is not None]
    kappa = cohen_kappa_score(*zip(*labels)) if len({v for p in labels for v in p}) > 1 else None
    rho = spearmanr(*zip(*aligned)).statistic if len(aligned) > 2 else None
    rho = None if rho is None or rho != rho else rho  # constant scores give NaN: no figure, not NaN in JSON
    return {"answers": len(both), "em_label_n": len(labels), "kappa": None if kappa is None else round(float(kappa), 4),
            "em_label_agree": round(sum(x == y for x, y in labels) / len(labels), 4) if labels else None,
            "aligned_n": len(aligned), "aligned_spearman": None if rho is None else round(float(rho), 4)}


def rescore(cfg: RunConfig, run_id: str, judge_config: Path, budget_usd: float | None = None) -> dict:
    """Judge a run's stored EM answers with another judge: its own judged rows, summary and anchors under
    em/judges/<model>/, and its agreement with the run's judge. Generates nothing."""
    from core.io import read_jsonl
    from judge.scorers import EMScorer
    from judge.session import session

    paths = cfg.run(run_id)
    if not paths.em_answers.is_file() or not paths.em_judged.is_file():
        raise MissingInput(f"run {run_id} has no EM answers and judgments yet ({paths.em}): run `em` first")
    rows, first = read_jsonl(paths.em_answers), read_jsonl(paths.em_judged)
    prompts = (_read_summary(paths) or {}).get("judge_prompts")  # the run's judge prompts: a file, or ours
    scorer = EMScorer(prompts if prompts and prompts != "project rubrics" else None)
    with session(judge_config, layout=cfg.layout, run=run_id, budget_usd=budget_usd) as judge:
        results, summary = judge.judge(rows, scorer, purpose="em-rescore")
        anchors = judge_anchors(judge, scorer, cfg.counts.em_anchors)
        model = judge.model
    judged = [r.row() for r in results]
    out = paths.em_judge(model)
    atomic_write_jsonl(out / "judged.jsonl", judged)
    result = summarise(judged, cfg.personas) | {"judge": summary.as_dict(), "anchors": anchors,
                                               "agreement": judge_agreement(first, judged), "model": model}
    atomic_write_json(out / "summary.json", result, indent=1)
    return result


def _read_summary(paths) -> dict | None:
    import json

    return json.loads(paths.em_summary.read_text()) if paths.em_summary.is_file() else None
