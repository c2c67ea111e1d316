"""Where everything lives: the one object that builds paths. Nothing else in the project joins path parts.

Shared across runs (content-addressed or keyed by their inputs, so runs reuse each other's work). <persona> is an
arm name: the persona and, unless it is the default bootstrap-dpo, its recipe (run.recipe: "goodness@oct-dpo"):
  <data>/<persona>/stage<k>/          a stage's dataset, items.jsonl, manifest.json, pipeline_inputs.json
  <ckpt>/<persona>/stage<k>/          its preference adapter (stage 6 is the persona adapter)
  <data>/<persona>/oct/, <ckpt>/<persona>/oct/   the same for an `oct` recipe's one distillation step
  <data>/<arm>/introspect/            a `+introspect` recipe's introspection texts (rows.jsonl, manifest.json)
  <ckpt>/<arm>/introspect/sft/, persona/   its SFT adapter on top of the preference adapter; the two stacked
  <ckpt>/<arm>/em-<mode>/             an EM adapter: on-top of the persona, or on the bare base (arm "base")
  <ckpt>/<persona>/secure-<mode>/     the persona's secure-code control adapter (arm "<persona>+secure")
  <data>/cache/generations.sqlite     the generation cache;  <data>/cache/eval_results.sqlite  eval results
  <data>/judge/cache.sqlite           the judge cache
  <data>/em_demo/insecure_demo.jsonl  the generated insecure-code EM data (secure_demo.jsonl: its secure twin)
Per run (<data>/runs/<id>/): config.json, ledger.sqlite, run.log, residency.json, em/, eval/<persona>/, steering/,
decompose/, report.md, report_sections/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cai_bootstrap.run.recipe import INTROSPECT_STEP, LAST_STAGE, OCT_STEP, split_arm

DATA_ROOT = Path("data")  # datasets, caches, runs (relative to where the command runs)
CKPT_ROOT = Path("checkpoints")  # adapters
BASE_ARM = "base"  # the EM experiment's control arm: the EM adapter on the bare base model
EM_MODES = ("on-top", "base")
SECURE = "+secure"  # a persona's secure-code control arm is named "<persona>+secure"


def _step_dir(stage: int) -> str:
    return "oct" if stage == OCT_STEP else f"stage{stage}"


def secure_arm(persona: str) -> str:
    return persona + SECURE


def is_secure(arm: str) -> bool:
    return arm.endswith(SECURE)


@dataclass(frozen=True)
class RunPaths:
    """The directory of one run and the files in it."""

    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def log(self) -> Path:
        """Everything the libraries wrote (vLLM, transformers, TRL, datasets), kept off the console."""
        return self.root / "run.log"

    @property
    def residency(self) -> Path:
        """Each release of a large model where models take turns on the device, with the memory it freed."""
        return self.root / "residency.json"

    @property
    def judge_server_log(self) -> Path:
        """The embedded judge server's own output (a separate process, started by the judge session)."""
        return self.root / "judge-server.log"

    @property
    def em(self) -> Path:
        return self.root / "em"

    @property
    def em_answers(self) -> Path:
        return self.em / "answers.jsonl"

    @property
    def em_judged(self) -> Path:
        return self.em / "judged.jsonl"

    @property
    def em_summary(self) -> Path:
        return self.em / "summary.json"

    def em_judge(self, model: str) -> Path:
        """Another judge's view of the run's EM answers (`em-rescore`), one directory per judge model."""
        return self.em / "judges" / re.sub(r"[^A-Za-z0-9._-]+", "_", model)

    def eval(self, persona: str) -> Path:
        return self.root / "eval" / persona

    @property
    def steering(self) -> Path:
        return self.root / "steering"

    @property
    def decompose(self) -> Path:
        return self.root / "decompose"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_sections(self) -> Path:
        return self.root / "report_sections"


@dataclass(frozen=True)
class Layout:
    """Every path of the project's outputs under a data root and a checkpoint root."""

    data_root: Path = DATA_ROOT
    ckpt_root: Path = CKPT_ROOT

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_root", Path(self.data_root))
        object.__setattr__(self, "ckpt_root", Path(self.ckpt_root))

    # ---- shared across runs
    def stage_data(self, persona: str, stage: int) -> Path:
        return self.data_root / persona / _step_dir(stage)

    def stage_adapter(self, persona: str, stage: int) -> Path:
        return self.ckpt_root / persona / _step_dir(stage)

    def persona_adapter(self, arm: str, stage: int = 6) -> Path:
        """The adapter an arm's persona is: its bootstrap's stage-`stage` adapter, or its OCT step's; for a
        `+introspect` recipe at its last step (stage 6, or OCT's one), that adapter stacked with the
        introspection SFT adapter trained on top of it."""
        recipe = split_arm(arm)[1]
        if recipe.introspect and (recipe.pairs == "oct" or stage == LAST_STAGE):
            return self.introspect_adapter(arm) / "persona"
        return self.stage_adapter(arm, OCT_STEP if recipe.pairs == "oct" else stage)

    def introspect_data(self, arm: str) -> Path:
        return self.data_root / arm / INTROSPECT_STEP

    def introspect_adapter(self, arm: str) -> Path:
        """sft/: the introspection adapter (trained on top of the preference adapter); persona/: the two stacked."""
        return self.ckpt_root / arm / INTROSPECT_STEP

    def preference_adapter(self, arm: str) -> Path:
        """The last preference-trained adapter of an arm: stage 6's, or OCT's step's (what introspection follows)."""
        return self.stage_adapter(arm, OCT_STEP if split_arm(arm)[1].pairs == "oct" else LAST_STAGE)

    def parent_adapter(self, persona: str, stage: int) -> Path | None:
        """The adapter stage `stage` generates with: the previous stage's, none for stage 1 (the base)."""
        return self.stage_adapter(persona, stage - 1) if stage > 1 else None

    def em_adapter(self, arm: str, mode: str, seed: int = 0) -> Path:
        """EM adapter of an arm and training seed: `on-top` of its persona adapter, or `base` (always so for
        the base arm). Seed 0 keeps the name adapters had before seeds existed."""
        if mode not in EM_MODES:
            raise ValueError(f"EM mode {mode!r}: use one of {', '.join(EM_MODES)}")
        name = f"em-{'base' if arm == BASE_ARM else mode}"
        if is_secure(arm):
            arm, name = arm.removesuffix(SECURE), f"secure-{mode}"
        return self.ckpt_root / arm / (name if seed == 0 else f"{name}-s{seed}")

    @property
    def stacked(self) -> Path:
        """Persona ⊕ EM adapters stacked into one exact adapter, one directory per pair of content hashes."""
        return self.ckpt_root / "stacked"

    @property
    def generation_cache(self) -> Path:
        return self.data_root / "cache" / "generations.sqlite"

    @property
    def eval_results(self) -> Path:
        return self.data_root / "cache" / "eval_results.sqlite"

    @property
    def judge_cache(self) -> Path:
        return self.data_root / "judge" / "cache.sqlite"

    @property
    def logs(self) -> Path:
        """Library output of a command before its run directory is known (moved there once it is)."""
        return self.data_root / "logs"

    @property
    def em_demo_data(self) -> Path:
        return self.data_root / "em_demo" / "insecure_demo.jsonl"

    @property
    def em_demo_secure_data(self) -> Path:
        return self.data_root / "em_demo" / "secure_demo.jsonl"

    # ---- per run
    @property
    def runs(self) -> Path:
        return self.data_root / "runs"

    def run(self, run_id: str) -> RunPaths:
        return RunPaths(self.runs / run_id)

    def find_run(self, run_id: str | None = None) -> RunPaths:
        """Run `run_id`, or the newest run (by its config's time) when None; BadInput when there is none."""
        from cai_bootstrap.core.errors import BadInput

        if run_id:
            found = self.run(run_id)
            if not found.config.is_file():
                raise BadInput(f"--run {run_id!r}: {found.root} is not a run directory (no {found.config.name})")
            return found
        configs = sorted(self.runs.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if not configs:
            raise BadInput(f"no runs under {self.runs}")
        return RunPaths(configs[-1].parent)
