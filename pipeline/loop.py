"""The bootstrap loop: for each persona, stages 1..K: generate (with guard) → train DPO (or ORPO) → next stage.
A persona with an `oct` recipe (run.recipe) runs its one distillation step instead of the stages.

Finished work is recognised before any engine starts (a stage's data records the inputs that made it;
a stage's adapter records its dataset and parent), so a rerun makes no engine, training or API call
and a resume after kill -9 redoes at most the batch in flight (the generation cache commits per batch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cai_bootstrap.constitution import load_constitution
from cai_bootstrap.core.budget import check_budget
from cai_bootstrap.core.console import console
from cai_bootstrap.core.errors import DeadEnd, MissingInput
from cai_bootstrap.core.io import atomic_dir, atomic_write_json
from cai_bootstrap.core.ledger import Ledger
from cai_bootstrap.engine.base import adapter_hash
from cai_bootstrap.engine.models import get_profile, model_fingerprint
from cai_bootstrap.engine.vllm_engine import VLLMEngine
from cai_bootstrap.pipeline.estimate import estimate_introspection, estimate_phase, guard_profile
from cai_bootstrap.run.config import RunConfig, check_ray, counts_from, save_config
from cai_bootstrap.run.recipe import (
    INTROSPECT_STEP,
    OCT_STEP,
    canonical,
    introspects,
    persona_of,
    reaches_persona,
    split_arm,
    steps_of,
)
from cai_bootstrap.stages.specs import get_stage

INPUTS_FILE = "pipeline_inputs.json"


class Engines:
    """The run's generation engines and guard, each started only when a phase needs it, held by one Residency
    (engine.residency): on CUDA, or with `one_resident`, using one releases the others and training releases
    all (one large model on the device at a time); on CPU they stay up across stages (start-ups dominate)."""

    def __init__(self, cfg: RunConfig) -> None:
        from cai_bootstrap.engine.residency import Residency

        self.cfg = cfg
        self.residency = Residency(cfg.one_resident)
        self.engine = None
        self.guard = None
        self.teacher = None

    def get(self):
        if self.engine is None:
            from cai_bootstrap.engine.factory import make_engine

            console.print(f"[dim]starting the {self.cfg.engine} engine for profile {self.cfg.profile}…[/dim]")
            from cai_bootstrap.train.stack import served_lora_rank

            rank = served_lora_rank(self.cfg)
            self.engine = self.residency.load("policy", lambda: make_engine(self.cfg.engine, self.cfg.profile,
                                                                            max_lora_rank=rank, **self.cfg.ray_args))
        return self.engine

    def get_teacher(self):
        """OCT's teacher: the policy's engine, or one of its own for `--teacher PROFILE` (where models take turns,
        the policy's engine is released while the teacher answers)."""
        if self.cfg.teacher in (None, self.cfg.profile):
            return self.get()
        if self.teacher is None:
            from cai_bootstrap.engine.factory import make_engine

            console.print(f"[dim]starting the {self.cfg.engine} engine for teacher {self.cfg.teacher}…[/dim]")
            self.teacher = self.residency.load("teacher", lambda: make_engine(self.cfg.engine, self.cfg.teacher,
                                                                              **self.cfg.ray_args))
        return self.teacher

    def get_guard(self):
        if self.guard is None:
            from cai_bootstrap.guard import load_guard

            self.guard = self.residency.load("guard", lambda: load_guard(self.cfg.guard, self.cfg.profile))
        return self.guard

    def make_room(self, phase: str = "training") -> None:
        """Before a phase that loads a model of its own (training, lm-eval, activation capture): where models take
        turns, every one of the run's is released first."""
        if self.residency.exclusive:
            self.residency.vacate(why=phase)

    def close(self) -> None:
        self.residency.close()
        self.engine = self.teacher = self.guard = None


def generation_inputs(cfg: RunConfig, persona: str, stage: int, parent: Path | None) -> dict:
    """Everything that determines a stage's data; equal inputs → the stored data is reused."""
    from cai_bootstrap.constitution.load import constitution_hash, load_constitution

    c = cfg.counts
    return {
        "persona": persona, "stage": stage, "profile": cfg.profile,
        "model": model_fingerprint(cfg.profile),
        "parent_adapter": adapter_hash(parent) if parent else None,
        "constitution": constitution_hash(load_constitution(persona_of(persona))),
        "guard": cfg.guard, "seed": cfg.seed,
        "counts": [c.n_tasks, c.n_samples, c.rounds, c.max_tokens, cfg.min_gap, c.red_team_share],
        "guard_policy": guard_policy(cfg, persona).model_dump(),
        "pairs": get_stage(stage).pair_rule,  # how the stage makes its pairs: data made another way is not reused
        **({"teacher": model_fingerprint(cfg.teacher or cfg.profile)} if stage == OCT_STEP else {}),
    }


def guard_policy(cfg: RunConfig, persona: str):
    from cai_bootstrap.guard.base import GuardPolicy

    return GuardPolicy.for_persona(persona_of(persona), cfg.guard_policy)


def _stored_inputs(data: Path) -> dict | None:
    f = data / INPUTS_FILE
    return json.loads(f.read_text()) if f.is_file() and (data / "manifest.json").is_file() else None


def run_bootstrap(stage: int | None = None, only: int | None = None, personas: list[str] | None = None,
                  profile: str = "tiny", budget_usd: float | None = None, run_id: str | None = None,
                  preset: str = "research", counts_json: str | None = None, engines: Engines | None = None,
                  **overrides) -> str:
    """Stages 1..`stage` (or just `only`) for each persona; returns the run id. Counts are the named preset
    with `counts_json` overriding its keys; every input is checked before any work starts. `engines`, when
    given, is the caller's (kept up for its later phases); otherwise the loop's own, closed at the end."""
    get_profile(profile)
    personas = [canonical(p) for p in personas or ["hhh"]]  # a bad recipe stops here, before any work
    cfg = RunConfig(personas=personas, profile=profile, stage=stage or only or 6, only=only,
                    counts=counts_from(preset, counts_json, profile=profile), **overrides)
    if cfg.teacher:
        get_profile(cfg.teacher)  # an unknown --teacher stops here too
    check_ray(cfg)
    for persona in cfg.personas:  # a bad recipe, constitution or guard policy stops here, before any work
        load_constitution(persona_of(persona))
        guard_policy(cfg, persona)
    run_id = run_id or cfg.default_id()
    save_config(cfg, run_id)
    stages = [only] if only else list(range(1, cfg.stage + 1))
    own = engines is None
    engines = engines or Engines(cfg)
    ledger = Ledger(cfg.run(run_id).ledger)
    starts0 = VLLMEngine.starts
    octs = [p for p in cfg.personas if steps_of(p, stages) != stages]
    console.rule(f"run {run_id}: personas {', '.join(cfg.personas)}, stages {stages[0]}..{stages[-1]}"
                 + (f" ({', '.join(octs)}: the OCT distillation step)" if octs else ""))
    try:
        for persona in cfg.personas:
            for k in steps_of(persona, stages):
                run_stage_once(cfg, run_id, persona, k, engines, ledger, budget_usd)
            if introspects(persona) and reaches_persona(persona, stages):
                introspect_arm(cfg, run_id, persona, engines, ledger, budget_usd)
    finally:
        _write_residency(cfg.run(run_id).residency, engines.residency, starts0)
        if own:
            engines.close()
        spent = ledger.total_usd(run_id)
        ledger.close()
    console.print(f"[green]done[/green]: run {run_id}, ${spent:.4f} spent; outputs in {cfg.data_root}/<persona>/"
                  f"stage<k> and {cfg.ckpt_root}/<persona>/stage<k>")
    return run_id


def _write_residency(path: Path, residency, starts0: int) -> None:
    """Whether models took turns, what each release freed (engine.residency), and the vLLM engines started."""
    atomic_write_json(path, {"one_resident": residency.exclusive, "vllm_engine_starts": VLLMEngine.starts - starts0,
                             "releases": residency.releases}, indent=1)


def _check_budget(cfg: RunConfig, ledger, run_id: str, budget: float | None, persona: str, stage: int,
                  *phases: str) -> None:
    check_budget(ledger, run_id, budget, f"{persona} stage {stage} {' and '.join(phases)}",
                 sum(estimate_phase(cfg, persona, stage, p).usd for p in phases))


def run_stage_once(cfg: RunConfig, run_id: str, persona: str, k: int, engines: Engines, ledger,
                   budget: float | None) -> None:
    lay = cfg.layout
    data, ckpt, parent = lay.stage_data(persona, k), lay.stage_adapter(persona, k), lay.parent_adapter(persona, k)
    if parent is not None and not (parent / "adapter_config.json").is_file():
        raise MissingInput(f"stage {k} needs the stage {k - 1} adapter at {parent}: run `--stage {k - 1}` "
                                f"for persona {persona} first")
    inputs = generation_inputs(cfg, persona, k, parent)
    if _stored_inputs(data) == inputs:
        console.print(f"{persona} {step_name(k)}: data reused from {data}")
    else:
        _check_budget(cfg, ledger, run_id, budget, persona, k, "startup", "generate", "guard")  # guard runs within
        _generate(cfg, run_id, persona, k, data, parent, inputs, engines, ledger)
    _train(cfg, run_id, persona, k, data, ckpt, parent, engines, ledger, budget)


def _generate(cfg, run_id, persona, k, data, parent, inputs, engines, ledger) -> None:
    from cai_bootstrap.stages.run import StageJob, run_stage

    c = cfg.counts
    eng, guard = engines.get(), engines.get_guard()
    job = StageJob(stage=k, persona=persona, out_dir=cfg.data_root, n_tasks=c.n_tasks, adapter=parent,
                   policy=guard_policy(cfg, persona), seed=cfg.seed, rounds=c.rounds, n_samples=c.n_samples,
                   max_tokens=c.max_tokens, min_gap=cfg.min_gap, red_team_share=c.red_team_share)
    manifest = run_stage(job, eng, cfg.layout.generation_cache, guard=guard,
                         teacher=engines.get_teacher if k == OCT_STEP else None,
                         log=lambda m: console.print(f"  [dim]{m}[/dim]"))
    atomic_write_json(data / INPUTS_FILE, inputs, indent=1)
    secs = manifest["engine_seconds"]
    ledger.record(run=run_id, kind="engine", phase="generate", stage=k, persona=persona, purpose="stage-data",
                  model=cfg.profile, tokens_in=manifest["tokens"]["engine_in"],
                  tokens_out=manifest["tokens"]["engine_out"], seconds=secs,
                  usd=secs * cfg.usd_per_engine_second, estimated=True,
                  cached=manifest["engine_calls"] == 0)
    if t := manifest.get("teacher_usage"):
        rate = cfg.model_copy(update={"profile": t["profile"]}).usd_per_engine_second
        ledger.record(run=run_id, kind="engine", phase="generate", stage=k, persona=persona, purpose="oct-teacher",
                      model=t["profile"], tokens_in=t["tokens_in"], tokens_out=t["tokens_out"], seconds=t["seconds"],
                      usd=t["seconds"] * rate, estimated=True, cached=t["calls"] == 0)
    if gsecs := manifest["guard_seconds"]:
        ledger.record(run=run_id, kind="engine", phase="guard", stage=k, persona=persona, purpose="stage-guard",
                      model=guard_profile(cfg), seconds=gsecs, usd=gsecs * cfg.usd_per_engine_second, estimated=True)
    console.print(f"{persona} {step_name(k)}: {manifest['counts']['train_rows']} pairs, "
                  f"{manifest['engine_calls']} engine calls, {secs:.0f} s")


def _train(cfg, run_id, persona, k, data, ckpt, parent, engines, ledger, budget) -> None:
    from cai_bootstrap.train.config import dpo_defaults
    from cai_bootstrap.train.dpo import dataset_hash, load_pairs, reusable

    recipe = split_arm(persona)[1]
    loss = recipe.loss
    dcfg = dpo_defaults(cfg.profile, max_steps=cfg.counts.dpo_max_steps, epochs=cfg.counts.dpo_epochs, seed=cfg.seed,
                        loss=loss, nll_weight=recipe.nll_weight)
    counts = json.loads((data / "manifest.json").read_text())["counts"]
    n_pairs = counts["train_rows"]
    if n_pairs < cfg.counts.min_pairs:
        why = ", ".join(f"{k} {v}" for k, v in sorted(counts["outcome"]["dropped"].items())) or "none dropped"
        raise DeadEnd(f"{persona} {step_name(k)}: {n_pairs} pairs kept of {counts['items']['total']} items, under the "
                      f"preset's minimum of {cfg.counts.min_pairs} (dropped: {why}); the stage data stays in {data}")
    if n_pairs == 0:
        _carry_forward(persona, k, data, ckpt, parent)
        return
    pairs = load_pairs(data)
    parent_hash = adapter_hash(parent) if parent else None
    if reusable(ckpt, dataset_hash(pairs), parent_hash, dcfg, model_fingerprint(cfg.profile)):
        console.print(f"{persona} {step_name(k)}: adapter reused from {ckpt}")
        return
    _check_budget(cfg, ledger, run_id, budget, persona, k, "train")
    engines.make_room()
    from cai_bootstrap.train.worker import run_training

    t0 = time.perf_counter()
    console.print(f"{persona} {step_name(k)}: training {loss.upper()} ({len(pairs)} pairs, "
                  f"{dcfg.max_steps} steps max)…")
    man = run_training("dpo", data=str(data), out=str(ckpt), cfg=dcfg, profile=cfg.profile,
                       parent=str(parent) if parent else None)
    secs = time.perf_counter() - t0
    ledger.record(run=run_id, kind="engine", phase="train", stage=k, persona=persona, purpose="dpo",
                  model=cfg.profile, seconds=secs, usd=secs * cfg.usd_per_engine_second, estimated=True)
    console.print(f"{persona} {step_name(k)}: adapter at {ckpt} ({man['steps']} steps, loss {man['train_loss']:.3f}, "
                  f"{secs:.0f} s, backend {man['backend']})")


def _carry_forward(persona: str, k: int, data: Path, ckpt: Path, parent: Path | None) -> None:
    """A stage whose data kept no pair cannot train: its adapter is the parent's, unchanged and labelled so
    (the report shows it), rather than stopping every later stage. Stage 1 has nothing to carry."""
    import shutil

    if parent is None:
        raise DeadEnd(f"{persona} {step_name(k)}: no preference pair survived ({data}/manifest.json says why); "
                      f"{step_name(k)} has no parent adapter to carry forward: raise --counts "
                      + ("n_tasks or max_tokens" if k == OCT_STEP else "n_tasks/n_samples or lower min_gap"))
    prev = json.loads((ckpt / "manifest.json").read_text()) if (ckpt / "manifest.json").is_file() else {}
    if prev.get("carried_from_hash") == adapter_hash(parent):
        console.print(f"{persona} stage {k}: adapter reused from {ckpt} (carried forward)")
        return
    with atomic_dir(ckpt) as tmp:
        for f in parent.glob("adapter_*"):
            shutil.copy2(f, tmp / f.name)
        atomic_write_json(tmp / "manifest.json", {
            "kind": "carried-forward", "steps": 0, "backend": "none (no pairs)", "parent_adapter": str(parent),
            "carried_from_hash": adapter_hash(parent), "reason": f"{data} kept 0 preference pairs"}, indent=1)
    console.print(f"[yellow]{persona} stage {k}: 0 pairs kept; the stage {k - 1} adapter is carried forward "
                  f"unchanged to {ckpt}[/yellow]")


def introspect_arm(cfg: RunConfig, run_id: str, arm: str, engines: Engines, ledger, budget: float | None) -> None:
    """OCT's introspection after an arm's preference training: texts written by the persona model about itself
    (stages.introspect), an SFT adapter trained on them on top of the frozen preference adapter (train.em's
    on-top mode), and the two stacked (train.stack) into the adapter the arm's persona is from now on."""
    lay = cfg.layout
    parent, data, ckpt = lay.preference_adapter(arm), lay.introspect_data(arm), lay.introspect_adapter(arm)
    if not (parent / "adapter_config.json").is_file():
        raise MissingInput(f"{arm}: introspection follows the preference adapter at {parent}, which is missing")
    c = cfg.counts
    inputs = {**generation_inputs(cfg, arm, OCT_STEP if split_arm(arm)[1].pairs == "oct" else 6, parent),
              "introspect": [c.introspect_per_prompt, c.introspect_conversations, c.introspect_turns,
                             c.introspect_max_tokens]}
    est = {e.phase: e.usd for e in estimate_introspection(cfg, arm)}
    if _stored_inputs(data) == inputs:
        console.print(f"{arm} introspection: texts reused from {data}")
    else:
        check_budget(ledger, run_id, budget, f"{arm} introspection", est["startup"] + est["generate"] + est["guard"])
        _introspect_texts(cfg, run_id, arm, parent, data, engines, ledger)
        atomic_write_json(data / INPUTS_FILE, inputs, indent=1)
    _introspect_train(cfg, run_id, arm, parent, data, ckpt, engines, ledger, budget, est["train"])


def _introspect_texts(cfg, run_id, arm, parent, data, engines, ledger) -> None:
    from cai_bootstrap.engine.cache import GenerationCache
    from cai_bootstrap.stages.introspect import Introspection, run_introspection

    c = cfg.counts
    eng = engines.get()
    with GenerationCache(cfg.layout.generation_cache) as cache:
        ix = Introspection(engine=eng, cache=cache, constitution=load_constitution(persona_of(arm)), adapter=parent,
                           max_tokens=c.introspect_max_tokens or c.max_tokens, seed=cfg.seed, guard=engines.get_guard(),
                           policy=guard_policy(cfg, arm))
        console.print(f"{arm} introspection: {c.introspect_per_prompt} answers to each reflection prompt, "
                      f"{c.introspect_conversations} self-interactions of {c.introspect_turns} turns…")
        man = run_introspection(ix, data, c.introspect_per_prompt, c.introspect_conversations, c.introspect_turns,
                                chat=get_profile(cfg.profile).chat)
    secs = man["engine_seconds"]
    ledger.record(run=run_id, kind="engine", phase="generate", stage=INTROSPECT_STEP, persona=arm,
                  purpose="introspect-texts",
                  model=cfg.profile, tokens_in=man["tokens"]["engine_in"], tokens_out=man["tokens"]["engine_out"],
                  seconds=secs, usd=secs * cfg.usd_per_engine_second, estimated=True, cached=man["cache_misses"] == 0)
    why = ", ".join(f"{k} {v}" for k, v in man["dropped"].items()) or "none"
    console.print(f"{arm} introspection: {man['rows']['total']} rows ({man['rows']['reflection']} reflections, "
                  f"{man['rows']['interaction']} turns), dropped: {why}")


def _introspect_train(cfg, run_id, arm, parent, data, ckpt, engines, ledger, budget, est_usd) -> None:
    from cai_bootstrap.train.config import introspect_defaults
    from cai_bootstrap.train.em import em_reusable
    from cai_bootstrap.train.stack import stack_adapters

    rows = data / "rows.jsonl"
    if not rows.read_text().strip():
        raise DeadEnd(f"{arm} introspection: no text survived ({data}/manifest.json says why); raise --counts "
                      "introspect_per_prompt or max_tokens")
    icfg = introspect_defaults(cfg.profile, max_steps=cfg.counts.introspect_max_steps, seed=cfg.seed)
    sft = ckpt / "sft"
    if em_reusable(sft, rows, icfg, cfg.profile, "on-top", parent):
        console.print(f"{arm} introspection: adapter reused from {sft}")
    else:
        check_budget(ledger, run_id, budget, f"{arm} introspection SFT", est_usd)
        engines.make_room()
        from cai_bootstrap.train.worker import run_training

        t0 = time.perf_counter()
        man = run_training("em", data=str(rows), out=str(sft), cfg=icfg, profile=cfg.profile, mode="on-top",
                           persona_adapter=str(parent), label="introspect-sft")
        secs = time.perf_counter() - t0
        ledger.record(run=run_id, kind="engine", phase="train", stage=INTROSPECT_STEP, persona=arm,
                      purpose="introspect-sft",
                      model=cfg.profile, seconds=secs, usd=secs * cfg.usd_per_engine_second, estimated=True)
        console.print(f"{arm} introspection: SFT adapter at {sft} ({man['steps']} steps, {secs:.0f} s)")
    persona = cfg.layout.persona_adapter(arm)
    made = json.loads((persona / "stack.json").read_text())["sources"] if (persona / "stack.json").is_file() else []
    if [s["hash"] for s in made] != [adapter_hash(parent), adapter_hash(sft)]:
        stack_adapters(parent, sft, persona)
    console.print(f"{arm}: persona adapter = preference ⊕ introspection, stacked at {persona}")


def step_name(k: int) -> str:
    return "OCT distillation" if k == OCT_STEP else f"stage {k}"
