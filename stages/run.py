"""One stage's data generation for one persona: self-instruct → guard prompts → respond → pairs (self-judge
or critique → revise) → guard answers → HF dataset + manifest under `<out_dir>/<persona>/stage<k>/`.

Every generation goes through the content-addressed cache, so a rerun (or a resumed, killed run) pays only
for what changed; the outputs are written to a temp directory and renamed into place.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from cai_bootstrap.constitution import Constitution, constitution_hash, load_constitution
from cai_bootstrap.constitution.load import dump_constitution
from cai_bootstrap.core.errors import CaiError
from cai_bootstrap.core.io import atomic_dir
from cai_bootstrap.engine.cache import GenerationCache
from cai_bootstrap.guard.base import Guard, GuardPolicy
from cai_bootstrap.run.config import Counts
from cai_bootstrap.run.layout import Layout
from cai_bootstrap.run.recipe import persona_of
from cai_bootstrap.stages import specs, steps
from cai_bootstrap.stages.filtering import GuardCounts, guard_answers, guard_prompts
from cai_bootstrap.stages.goal import goal_figure
from cai_bootstrap.stages.specs import get_stage

_C = Counts()  # the project's count defaults
# what items.jsonl keeps of every item, dropped ones too: its identity and outcome, and the texts it made
# (answers, critiques, every revision attempt, the pair), so a drop can be read, not only counted
ITEM_FIELDS = ("key", "task", "source", "status", "reason", "principle_ids", "round_tokens", "tokens", "misses",
               "check", "passed", "samples", "finish", "scores", "critiques", "revisions", "chosen", "rejected")


class CountsError(CaiError, AssertionError):
    """The manifest's counts do not add up: a bug in the bookkeeping, never silently written (exit 1)."""


def _features(chat: bool = True):
    from datasets import Features, List, Value

    msgs = List({"role": Value("string"), "content": Value("string")}) if chat else Value("string")
    return Features({
        "prompt": msgs, "chosen": msgs, "rejected": msgs,
        "item_key": Value("string"), "stage": Value("int32"), "persona": Value("string"),
        "task_source": Value("string"), "principle_ids": List(Value("string")),
        "model_fingerprint": Value("string"), "adapter_fingerprint": Value("string"),
        "constitution_hash": Value("string"), "scores": List(Value("float64")),  # expected values, not ints
        "guard_action": Value("string"), "guard_prompt": Value("string"), "guard_chosen": Value("string"),
        "guard_rejected": Value("string"),
        "check": Value("string"),  # stages 1 and 4: what code checked, and what chosen and rejected passed
    })


def _pair(it: dict, chat: bool) -> dict:
    """prompt/chosen/rejected as the model generated them: chat messages, or a base model's transcript turn."""
    if chat:
        return {"prompt": [{"role": "user", "content": it["task"]}],
                "chosen": [{"role": "assistant", "content": it["chosen"]}],
                "rejected": [{"role": "assistant", "content": it["rejected"]}]}
    return {"prompt": specs.BASE_TURN.format(task=it["task"]), "chosen": " " + it["chosen"],
            "rejected": " " + it["rejected"]}


def _row(it: dict, persona: str, model_fp: str, adapter_fp: str, chash: str, action: str, chat: bool = True) -> dict:
    dump = lambda v: json.dumps(v) if v is not None else None  # noqa: E731
    return {
        **_pair(it, chat),
        "item_key": it["key"], "stage": it["stage"], "persona": persona, "task_source": it["source"],
        "principle_ids": it["principle_ids"], "model_fingerprint": model_fp, "adapter_fingerprint": adapter_fp,
        "constitution_hash": chash, "scores": it["scores"], "guard_action": action,
        "guard_prompt": dump(it["guard_prompt"]), "guard_chosen": dump(it["guard_chosen"]),
        "guard_rejected": dump(it["guard_rejected"]),
        "check": dump(it["check"] and {**it["check"], "chosen_followed": it["followed"][it["chosen_j"]],
                                       "rejected_followed": it["followed"][it["rejected_j"]]}),
    }


@dataclass(frozen=True)
class StageJob:
    """What one stage's data is made from, besides the models that make it: the stage, the persona (an arm name:
    run.recipe), where the data goes, the parent adapter and the counts. A run builds one per persona and stage."""

    stage: int
    persona: str
    out_dir: str | Path = "data"
    n_tasks: int = _C.n_tasks
    adapter: str | Path | None = None  # the parent stage's adapter, active while generating
    policy: GuardPolicy | None = None  # None: the persona's guard policy
    seed: int = 0
    constitution: Constitution | str | Path | None = None  # None: the persona's constitution
    rounds: int = _C.rounds
    n_samples: int = _C.n_samples
    min_gap: float = 1.0
    max_tokens: int = _C.max_tokens
    task_tokens: int = 48
    oversample: float = 2.0
    chat: bool | None = None  # None: the engine's profile says
    # stage 6 and OCT's distillation: this share of n_tasks are red-team prompts (specs.RED_TEAM_SEEDS)
    red_team_share: float = 0.0


@dataclass
class _Made:
    """What a stage's generation made, for its rows and manifest."""

    items: list[dict]
    tasks: list[str]
    red: list[dict]
    si: Counter
    red_si: Counter
    gcounts: GuardCounts = field(default_factory=GuardCounts)
    guard_s: float = 0.0
    teacher_usage: dict | None = None
    teacher_fp: str | None = None


def run_stage(job: StageJob, engine, cache: GenerationCache | str | Path, guard: Guard | None = None, teacher=None,
              log: Callable[[str], None] | None = None) -> dict:
    """Generate one stage's preference data (`job`) with `engine` through `cache`, guarded by `guard`; returns the
    manifest (also written to disk). `teacher` is OCT's teacher engine, or a function that starts it once the
    policy has answered (default: `engine` itself); its usage is reported apart."""
    from cai_bootstrap.engine.base import adapter_hash

    t0 = time.perf_counter()
    spec = get_stage(job.stage)
    constitution = (job.constitution if isinstance(job.constitution, Constitution)
                    else load_constitution(job.constitution or persona_of(job.persona)))
    policy = job.policy or GuardPolicy.for_persona(persona_of(job.persona))
    own_cache = not isinstance(cache, GenerationCache)
    cache = GenerationCache(cache) if own_cache else cache
    log = log or (lambda msg: None)
    calls0, usage0 = engine.calls, len(engine.usage)
    ctx = steps.Ctx(engine=engine, cache=cache, constitution=constitution, spec=spec, adapter=job.adapter,
                    chat=engine.profile.chat if job.chat is None else job.chat, seed=job.seed,
                    max_tokens=job.max_tokens)
    try:
        made = _make_items(job, ctx, log)
        t_guard = time.perf_counter()
        guard_prompts(made.items, guard, policy, made.gcounts)
        made.guard_s = time.perf_counter() - t_guard
        _make_pairs(job, ctx, made, teacher, log)
        t_guard = time.perf_counter()
        guard_answers(made.items, guard, policy, made.gcounts)
        made.guard_s += time.perf_counter() - t_guard
    finally:
        if own_cache:
            cache.close()
    ids = _Ids(job.persona, engine.fingerprint, adapter_hash(job.adapter) if job.adapter else "",
               constitution_hash(constitution))
    train_rows, quarantine_rows = _rows(ids, ctx, made.items, policy)
    manifest = _manifest(job, ctx, made, ids, policy, train_rows, quarantine_rows, calls0, usage0)
    check_counts(manifest)
    out = Layout(data_root=job.out_dir).stage_data(job.persona, job.stage)
    ds = _dataset(ctx.chat, train_rows, quarantine_rows)
    manifest["wall_seconds"] = round(time.perf_counter() - t0, 3)
    _write_atomic(out, ds, manifest, constitution, made.items)
    o = manifest["counts"]["outcome"]
    log(f"wrote {out}: {o['train']} pairs, {o['quarantine']} quarantined, {o['dropped_total']} dropped "
        f"({o['dropped']}); {manifest['engine_calls']} engine calls")
    return manifest


def _make_items(job: StageJob, ctx: steps.Ctx, log: Callable[[str], None]) -> _Made:
    """The stage's tasks as items: self-instructed (topped up from the stage's seeds), made by code (stage 4), and
    red-team prompts self-instructed apart."""
    spec = ctx.spec
    # red-team prompts go to stage 6 only: its critique → revision makes the harmlessness pair (a harmful
    # original, its safe revision); stages 1-5 would score a compliant answer to them by an unrelated ideal
    n_red = round(job.n_tasks * job.red_team_share) if spec.pairs in ("critique-revise", "distill") else 0
    n = job.n_tasks - n_red
    log(f"stage {job.stage} ({spec.name}), persona {job.persona}: self-instruct {n} tasks"
        + (f" and {n_red} red-team prompts" if n_red else ""))
    if spec.check == "known-answer":  # stage 4's tasks are made by code, each with its known answer
        tasks, si = [], Counter()
        items = steps.known_answer_items(job.stage, n, job.seed)
    else:
        tasks, si = steps.self_instruct(ctx, n, task_tokens=job.task_tokens, oversample=job.oversample)
        items = _with_seeds([steps.new_item(job.stage, t, "self-instruct") for t in tasks], spec.seeds, n,
                            job.stage, "seed", set())
    if spec.check == "constraints":
        items = [steps.constrained(it, job.max_tokens) for it in items]
    red_tasks, red_si = steps.self_instruct(ctx, n_red, task_tokens=job.task_tokens, oversample=job.oversample,
                                            red_team=True) if n_red else ([], Counter())
    taken = {it["key"] for it in items}
    red = _with_seeds([steps.new_item(job.stage, t, "red-team") for t in red_tasks
                       if steps.item_key(job.stage, t) not in taken], specs.RED_TEAM_SEEDS, n_red, job.stage,
                      "red-team", taken)
    return _Made(items=items + red, tasks=tasks, red=red, si=si, red_si=red_si)


def _make_pairs(job: StageJob, ctx: steps.Ctx, made: _Made, teacher, log: Callable[[str], None]) -> None:
    """Answers and the stage's pair rule over the live items: OCT's distillation (the teacher's answer against the
    policy's), self-judged samples (stages 1-5), or critique → revision (stage 6)."""
    spec, items = ctx.spec, made.items
    log(f"respond: {len(steps.active(items))} tasks × {job.n_samples if spec.pairs == 'self-judge' else 1}")
    if spec.pairs == "distill":
        steps.respond(ctx, items, n=1, temperature=steps.DISTILL_TEMPERATURE)
        log("teacher: the same tasks with the constitution in its system prompt")
        teacher = teacher() if callable(teacher) else teacher or ctx.engine
        t_calls0, t_usage0 = teacher.calls, len(teacher.usage)
        steps.distill(ctx, items, teacher)
        made.teacher_fp = teacher.fingerprint
        # a teacher of its own (OCT with --teacher): its calls, seconds and tokens, priced at its own profile
        made.teacher_usage = _usage(teacher, t_calls0, t_usage0) if teacher is not ctx.engine else None
    elif spec.pairs == "self-judge":
        steps.respond(ctx, items, n=job.n_samples)
        log("score own samples")
        steps.score(ctx, items)
        steps.self_judge_pairs(items, min_gap=job.min_gap, counts=ctx.counts)
    else:
        steps.respond(ctx, items, n=1)
        log(f"critique → revise × {job.rounds}")
        steps.critique_revise(ctx, items, rounds=job.rounds)


class _Ids(NamedTuple):
    """What every row and the manifest say the stage's data was made from."""

    persona: str
    model_fp: str
    adapter_fp: str  # "" without a parent adapter
    constitution_hash: str


def _rows(ids: _Ids, ctx: steps.Ctx, items: list[dict], policy: GuardPolicy) -> tuple[list[dict], list[dict]]:
    """The dataset's rows: kept pairs to train on, quarantined ones apart (and trained on where the policy says)."""
    train_rows, quarantine_rows = [], []
    for it in items:
        if it["status"] == "live":
            train_rows.append(_row(it, *ids, "keep", ctx.chat))
        elif it["status"] == "quarantined":
            row = _row(it, *ids, "quarantine", ctx.chat)
            quarantine_rows.append(row)
            if policy.include_quarantined:
                train_rows.append(row)
    return train_rows, quarantine_rows


def _manifest(job: StageJob, ctx: steps.Ctx, made: _Made, ids: _Ids, policy: GuardPolicy, train_rows: list[dict],
              quarantine_rows: list[dict], calls0: int, usage0: int) -> dict:
    """What the stage made and what it cost, counted: every item kept, quarantined or dropped by reason."""
    spec, items, engine, constitution = ctx.spec, made.items, ctx.engine, ctx.constitution
    adapter_fp, chash = ids.adapter_fp, ids.constitution_hash
    usage = engine.usage[usage0:]
    return {
        "persona": job.persona, "stage": job.stage, "stage_name": spec.name, "pairs": spec.pair_rule,
        "constitution": {"name": constitution.name, "version": constitution.version, "hash": chash},
        "engine": engine.name, "model_fingerprint": ids.model_fp,
        "adapter": str(job.adapter) if job.adapter else None, "adapter_fingerprint": adapter_fp or None,
        "seed": job.seed, "rounds": job.rounds if job.stage == 6 else None,
        "n_samples": job.n_samples if spec.pairs == "self-judge" else 1,
        "teacher": made.teacher_fp, "max_tokens": job.max_tokens, "chat": ctx.chat,
        "policy": policy.model_dump(mode="json"),
        "counts": {**_item_counts(made, policy, train_rows, quarantine_rows), **_generation_counts(ctx, items)},
        "goal": goal_figure(spec, items),
        "tokens": {"engine_in": sum(u.tokens_in for u in usage), "engine_out": sum(u.tokens_out for u in usage),
                   "items_total": sum(it["tokens"] for it in items)},
        "engine_calls": engine.calls - calls0,
        "teacher_usage": made.teacher_usage,
        "engine_seconds": round(sum(u.seconds for u in usage), 3),
        "guard_seconds": round(made.guard_s, 3),
    }


def _item_counts(made: _Made, policy: GuardPolicy, train_rows: list[dict], quarantine_rows: list[dict]) -> dict:
    items, red, si = made.items, made.red, made.si
    dropped = Counter(it["reason"] for it in items if it["status"] == "dropped")
    return {
        "self_instruct": {"proposed": si["proposed"], "accepted": si["accepted"],
                          "rejected": {k.removeprefix("rejected_"): v for k, v in si.items()
                                       if k.startswith("rejected_")}},
        "items": {"total": len(items), "from_self_instruct": len(made.tasks),
                  "from_seeds": sum(it["source"] == "seed" for it in items),
                  "known_answer": sum(it["source"] == "known-answer" for it in items), "red_team": len(red)},
        # red-team prompts: proposed and accepted by self-instruct, kept as pairs, and kept pairs whose
        # rejected (original) answer the guard blocks: a harmful answer against its safe revision
        "red_team": {"proposed": made.red_si["proposed"], "accepted": made.red_si["accepted"],
                     "train": sum(it["status"] == "live" for it in red),
                     "unsafe_rejected_kept": sum(it["status"] == "live" and _blocked(it["guard_rejected"], policy)
                                                 for it in red)},
        "outcome": {"train": sum(it["status"] == "live" for it in items), "quarantine": len(quarantine_rows),
                    "dropped": dict(dropped), "dropped_total": sum(dropped.values())},
        "train_rows": len(train_rows),
        "guard": made.gcounts.as_dict(),
    }


def _generation_counts(ctx: steps.Ctx, items: list[dict]) -> dict:
    regenerated = sum(it["misses"] > 0 for it in items)
    return {
        "unparsable_scores": ctx.counts["unparsable_scores"],
        # samples kept off the chosen side (stages 1-5) and later-round revisions that could not stand
        # (stage 6, the item kept its earlier revision), by reason
        "chosen_side": {k: v for k, v in sorted(ctx.counts.items())
                        if k.startswith(("not_chosen_", "rejected_truncated", "later_round_"))},
        "items_regenerated": regenerated, "items_from_cache": len(items) - regenerated,
        "generation_requests": {k.removesuffix("_requests"): v for k, v in ctx.counts.items()
                                if k.endswith("_requests")},
        "cache_misses": {k.removesuffix("_cache_misses"): v for k, v in ctx.counts.items()
                         if k.endswith("_cache_misses")},
    }


def _dataset(chat: bool, train_rows: list[dict], quarantine_rows: list[dict]):
    from datasets import Dataset, DatasetDict

    feats = _features(chat)
    as_ds = lambda rows: Dataset.from_dict({k: [r[k] for r in rows] for k in feats}, features=feats)  # noqa: E731
    ds = DatasetDict({"train": as_ds(train_rows)})
    if quarantine_rows:
        ds["quarantine"] = as_ds(quarantine_rows)
    return ds


def _usage(eng, calls0: int, usage0: int) -> dict:
    usage = eng.usage[usage0:]
    return {"profile": eng.profile.name, "calls": eng.calls - calls0,
            "seconds": round(sum(u.seconds for u in usage), 3),
            "tokens_in": sum(u.tokens_in for u in usage), "tokens_out": sum(u.tokens_out for u in usage)}


def _with_seeds(items: list[dict], seeds: list[str], n: int, stage: int, source: str, taken: set[str]) -> list[dict]:
    """`items` topped up from `seeds` (as `source` items) when the model proposed fewer than `n` usable ones."""
    seen = taken | {it["key"] for it in items}
    for s in seeds:
        if len(items) >= n:
            break
        if steps.item_key(stage, s) not in seen:
            items.append(steps.new_item(stage, s, source))
            seen.add(steps.item_key(stage, s))
    return items


def _blocked(verdict: dict | None, policy: GuardPolicy) -> bool:
    from cai_bootstrap.guard.base import Verdict
    from cai_bootstrap.guard.policy import is_blocked

    return verdict is not None and is_blocked(Verdict.model_validate(verdict), policy)


def check_counts(m: dict) -> None:
    c = m["counts"]
    si = c["self_instruct"]
    if si["proposed"] != si["accepted"] + sum(si["rejected"].values()):
        raise CountsError(f"self-instruct: {si}")
    o, total = c["outcome"], c["items"]["total"]
    if total != o["train"] + o["quarantine"] + o["dropped_total"]:
        raise CountsError(f"items: {total} != {o}")
    if c["items"]["from_self_instruct"] != si["accepted"]:
        raise CountsError("accepted tasks and self-instruct items differ")
    for filt, acts in c["guard"].items():
        drop_n = acts.get("drop", {}).get("_items", 0)
        mine = sum(v for k, v in o["dropped"].items() if k.startswith(f"guard_{filt}"))
        if drop_n != mine:
            raise CountsError(f"guard {filt}: {drop_n} drops counted, {mine} items dropped")


def _write_atomic(out: Path, ds, manifest: dict, constitution: Constitution, items: list[dict]) -> None:
    with atomic_dir(out) as tmp:
        ds.save_to_disk(str(tmp), num_shards={s: 1 for s in ds})  # 0 shards of an empty split do not load
        (tmp / "constitution.yaml").write_text(dump_constitution(constitution), encoding="utf-8")
        with (tmp / "items.jsonl").open("w", encoding="utf-8") as f:
            for it in items:  # every item, dropped ones too: `diff` plans their regeneration, a reader audits drops
                f.write(json.dumps({k: it.get(k) for k in ITEM_FIELDS}) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
