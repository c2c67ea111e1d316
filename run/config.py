"""A run's resolved configuration: everything that determines its outputs, saved in its directory.

Counts come from a named preset (`research`, `demo`, `quick`); `--counts '{"key": value}'` overrides keys
of the chosen one. Every model here forbids unknown keys, so a typo is an error that names the key and
where it came from, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai_bootstrap.core.console import move_log
from cai_bootstrap.core.errors import BadInput, MissingInput, field_errors
from cai_bootstrap.core.io import atomic_write_json
from cai_bootstrap.engine.models import get_profile
from cai_bootstrap.run.layout import CKPT_ROOT, DATA_ROOT, Layout, RunPaths


class Counts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_tasks: int = 12
    n_samples: int = 3
    rounds: int = 2
    max_tokens: int = 96
    min_gap: float | None = None  # stages 1-5: least self-judged score gap (1-10); None: the profile's
    dpo_max_steps: int | None = 8  # caps a stage's DPO run; None: `dpo_epochs` over its pairs decide
    dpo_epochs: float = 1.0
    # a stage keeping fewer pairs stops the run, naming the persona, stage and drops by reason (its data is
    # kept); 0: a stage with no pair carries its parent adapter forward (the tiny demos)
    min_pairs: int = 0
    red_team_share: float = Field(0.0, ge=0, le=1)  # of stage 6's tasks: red-team prompts (stages.specs)
    # EM at research scale (Betley et al.): the whole EM data set for one epoch per seed, 50 answers per
    # question at temperature 1 with up to 600 new tokens, several training seeds per arm
    em_rows: int | None = None  # None: every row of the EM data
    em_max_steps: int | None = None  # None: one epoch
    em_save_every: int = 25  # a checkpoint every N steps: the phase curve
    em_samples: int = 50  # answers per EM question and final model (temperature 1)
    em_curve_questions: int = 8  # every checkpoint answers the same first N main questions
    em_curve_samples: int = 10  # answers per question at each checkpoint
    em_answer_tokens: int = 600
    em_seeds: int = 3  # EM training seeds per arm; intervals resample them
    em_anchors: int | None = None  # judge anchors beside the EM run; None: all, N: a share of each category
    # a `+introspect` recipe (stages.introspect): samples per self-reflection prompt, self-interaction
    # conversations and their turns (OCT: 1,000 per prompt, 2,000 conversations of 10 turns), SFT steps
    introspect_per_prompt: int = Field(2, ge=1)
    introspect_conversations: int = Field(4, ge=0)
    introspect_turns: int = Field(4, ge=1)
    introspect_max_steps: int | None = 8  # None: one epoch
    # a text's token cap (None: max_tokens); a cut text is not a row. The tiny model's self-reflections run long:
    # 6 of 20 ended within 512 tokens, none within 160 (tests/test_recipes.py's run)
    introspect_max_tokens: int | None = 512


PRESETS: dict[str, Counts] = {
    # the research counts scaled to the tiny CPU model; a GPU profile's research counts are RESEARCH_GPU
    "research": Counts(),
    # `make demo`: the tiny model with small counts, two personas, every phase of a research run, in under
    # 20 minutes on 2 CPU cores (README). The research counts take about 3.4 min per stage there (stage 1
    # measured: 131 s generating, 74 s training 8 steps).
    "demo": Counts(n_tasks=4, n_samples=3, rounds=1, max_tokens=64, dpo_max_steps=2, em_rows=16, em_max_steps=6,
                   em_save_every=3, em_samples=1, em_curve_questions=4, em_curve_samples=1, em_answer_tokens=32,
                   em_seeds=1, em_anchors=24, introspect_per_prompt=1, introspect_conversations=2,
                   introspect_turns=2, introspect_max_steps=2),
    # `demo --quick`: one persona and the base control, about 8 minutes on 2 CPU cores (README). Decode steps
    # dominate, but a cut answer is never chosen: at 32 new tokens stage 1 kept no pair, so 64
    "quick": Counts(n_tasks=4, n_samples=3, rounds=1, max_tokens=64, dpo_max_steps=2, em_rows=16,
                    em_max_steps=4, em_save_every=2, em_samples=1, em_curve_questions=3, em_curve_samples=1,
                    em_answer_tokens=32, em_seeds=1, em_anchors=18, introspect_per_prompt=1,
                    introspect_conversations=2, introspect_turns=2, introspect_max_steps=2),
}


# A GPU profile's research counts, sized to the experiment's $50-150: three personas' six stages and the EM
# experiment judged by the EM paper's GPT-4o come to about $127 on qwen2.5-7b (`estimate --profile qwen2.5-7b
# --persona goodness --persona sycophancy --persona misalignment --json`: stages $50 with $3.75 of engine
# start-ups and model loads, EM training and answering $12, judging $65). Answers up to 1,024 new
# tokens, so that a full answer is rarely cut (a cut one is never chosen); one DPO epoch over the kept pairs
# (OpenCharacterTraining trains one); a stage keeping under 100 pairs stops the run rather than train on a
# handful. A tenth of stage 6's tasks are red-team prompts, whose harmful originals and safe revisions are
# the harmlessness pairs. A `+introspect` recipe writes a tenth of OCT's introspection texts: 100 answers to each
# of the 10 self-reflection prompts and 200 self-interactions of 10 turns, one SFT epoch over them.
RESEARCH_GPU = Counts(n_tasks=1200, n_samples=4, rounds=2, max_tokens=1024, dpo_max_steps=None, dpo_epochs=1.0,
                      min_pairs=100, red_team_share=0.1, introspect_per_prompt=100, introspect_conversations=200,
                      introspect_turns=10, introspect_max_steps=None, introspect_max_tokens=None)
TINY_ONLY = ("demo", "quick")  # sized for the tiny model on 2 CPU cores


def preset_counts(preset: str, profile: str = "tiny") -> Counts:
    """The named preset for `profile`: `research` is RESEARCH_GPU on a GPU profile; the tiny presets are an
    error there (their 32-token answers and 2 DPO steps would mean nothing on a 7B model)."""
    if preset not in PRESETS:
        raise BadInput(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    if profile == "tiny":
        return PRESETS[preset]
    if preset in TINY_ONLY:
        raise BadInput(f"--preset {preset}: sized for the tiny CPU model, not profile {profile!r}; use --preset "
                       "research (and --counts to change single counts)")
    return RESEARCH_GPU


def counts_from(preset: str = "research", overrides: str | None = None, source: str = "--counts",
                profile: str = "tiny") -> Counts:
    """The named preset for `profile` with the JSON object `overrides` applied; an unknown preset or key is
    `BadInput` naming it and `source` (the flag or file it came from)."""
    base = preset_counts(preset, profile)
    if not overrides:
        return base
    try:
        update = json.loads(overrides)
    except json.JSONDecodeError as e:
        raise BadInput(f"{source}: not valid JSON ({e.msg}): {overrides!r}") from None
    if not isinstance(update, dict):
        raise BadInput(f"{source}: expected a JSON object of count names, got {overrides!r}")
    try:
        return Counts.model_validate(base.model_dump() | update)
    except ValidationError as e:
        raise BadInput(f"{source}: {field_errors(e)} (count names: {', '.join(Counts.model_fields)})") \
            from None


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    personas: list[str] = Field(default_factory=lambda: ["hhh"])
    profile: str = "tiny"
    stage: int = 6  # run stages 1..stage
    only: int | None = None  # run just this stage from the existing stage-1 adapter
    engine: str = "auto"
    guard: str | None = None  # None: the profile decides (tiny stand-in on CPU)
    guard_policy: str | None = None  # a policy YAML (guard/policy.yaml's keys); None: that file
    teacher: str | None = None  # OCT recipes' teacher profile (run.recipe); None: the policy's own profile
    # one large model resident at a time (engine.residency): None on CUDA only, True forces it (CPU tests, bench)
    one_resident: bool | None = None
    # where generation runs: None in this process; "local" or a cluster address: vLLM engines on Ray Data workers
    # (engine.ray_engine). Not part of the run's id: the same config makes the same data wherever it runs
    ray: str | None = None
    ray_replicas: int | None = Field(None, ge=1)  # engine replicas under `ray` (None: the profile's data_parallel_size)
    seed: int = 0
    counts: Counts = Field(default_factory=Counts)
    data_root: str = str(DATA_ROOT)
    ckpt_root: str = str(CKPT_ROOT)
    gpu_hour_usd: float | None = None  # None: the profile's price

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.data_root), Path(self.ckpt_root))

    def run(self, run_id: str) -> RunPaths:
        return self.layout.run(run_id)

    @property
    def usd_per_engine_second(self) -> float:
        """$ per second of the run's engine: every GPU it holds, times its replicas on Ray."""
        p = get_profile(self.profile)
        price = p.gpu_hour_usd if self.gpu_hour_usd is None else self.gpu_hour_usd
        return price * max(p.gpus, 1) * self.replicas / 3600.0 if price else 0.0

    @property
    def ray_args(self) -> dict:
        """make_engine's arguments for where the run generates: on Ray workers, and how many, or here."""
        return {"ray": self.ray, "replicas": self.replicas} if self.ray else {}

    @property
    def replicas(self) -> int:
        """Engines generating at once: one, or on Ray the replicas asked for (default: the profile's)."""
        if self.ray is None:
            return 1
        return self.ray_replicas or get_profile(self.profile).data_parallel_size

    @property
    def min_gap(self) -> float:
        c = self.counts.min_gap
        return c if c is not None else get_profile(self.profile).min_score_gap

    def default_id(self) -> str:
        """Same config → same id, so a rerun lands in the same directory and reuses its work."""
        # json.dumps' default separators, not canonical_json: the id derivation of earlier runs is kept (an
        # id still changes whenever the config, counts included, does)
        # (a field added later stays out while unset, so the runs made before it keep their ids)
        unset = {"teacher"} if self.teacher is None else set()
        blob = json.dumps(self.model_dump(exclude={"stage", "only", "ray", "ray_replicas"} | unset), sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
        return f"{self.profile}-{'-'.join(self.personas)}-{digest}"


def check_ray(cfg: RunConfig) -> None:
    """`--ray` needs Ray installed and the vLLM engine: said before any work starts, not at the first call."""
    import importlib.util

    if cfg.ray is None:
        return
    if importlib.util.find_spec("ray") is None:
        raise BadInput("--ray: Ray is not installed (pip install -e '.[ray]')")
    if cfg.engine not in ("auto", "vllm"):
        raise BadInput(f"--ray runs vLLM engines on Ray workers; --engine {cfg.engine} cannot")


def save_config(cfg: RunConfig, run_id: str) -> Path:
    """Write the run's config; from here on, library output goes to the run's own log (when quiet)."""
    move_log(cfg.run(run_id).log)
    return atomic_write_json(cfg.run(run_id).config, {"run_id": run_id, **cfg.model_dump()})


def load_run_config(run_path: Path) -> tuple[str, RunConfig]:
    path = RunPaths(Path(run_path)).config
    if not path.is_file():
        raise MissingInput(f"{run_path} is not a run directory (no config.json)")
    raw = json.loads(path.read_text())
    run_id = raw.pop("run_id", Path(run_path).name)
    try:
        return run_id, RunConfig.model_validate(raw)
    except ValidationError as e:
        raise BadInput(f"{path}: {field_errors(e)}") from None
