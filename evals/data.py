"""The held-out evaluation sets shipped in `evals/data/`, validated on load (errors name file and field),
and the disjointness check against the stage task pools (seed tasks + stored self-instructed tasks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from cai_bootstrap.core.errors import BadInput

DATA_DIR = Path(__file__).resolve().parent / "data"
PROMPTS = DATA_DIR / "prompts.yaml"
SAFETY = DATA_DIR / "safety.yaml"
MC = DATA_DIR / "capability_mc.json"
ROUGE_MAX = 0.7  # a held-out prompt within this ROUGE-L F1 of a pool task is not held out


class EvalDataError(BadInput):
    """A held-out data file that cannot be used; the message names the file and field."""


def _clean(v: list[str]) -> list[str]:
    for i, s in enumerate(v):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"item {i} is empty or not a string")
    if len(set(v)) != len(v):
        raise ValueError("contains duplicate prompts")
    return [s.strip() for s in v]


class HeldOutPrompts(BaseModel):
    version: str
    general: list[str] = Field(min_length=40)
    stage_kinds: dict[int, list[str]]

    _c = field_validator("general")(_clean)

    @field_validator("stage_kinds")
    @classmethod
    def _kinds(cls, v: dict[int, list[str]]) -> dict[int, list[str]]:
        if sorted(v) != [1, 2, 3, 4, 5, 6]:
            raise ValueError(f"needs kinds 1..6, got {sorted(v)}")
        for k, prompts in v.items():
            if len(prompts) < 10:
                raise ValueError(f"kind {k}: at least 10 prompts, got {len(prompts)}")
            v[k] = _clean(prompts)
        return v

    def for_stage(self, k: int, n_general: int | None = None, n_kind: int | None = None) -> list[dict]:
        """Rows {id, question, set} a stage-k model is compared on: the general set plus the prompts of
        stage k's own kind (stage 0, the base, gets only the general set)."""
        rows = [{"id": f"g{i:03d}", "question": q, "set": "general"} for i, q in enumerate(self.general[:n_general])]
        if k in self.stage_kinds:
            rows += [{"id": f"k{k}-{i:02d}", "question": q, "set": f"kind{k}"}
                     for i, q in enumerate(self.stage_kinds[k][:n_kind])]
        return rows

    def all_prompts(self) -> list[str]:
        return [*self.general, *(p for k in sorted(self.stage_kinds) for p in self.stage_kinds[k])]


class SafetyPrompts(BaseModel):
    version: str
    harmful: list[str] = Field(min_length=25)
    risky_harmless: list[str] = Field(min_length=25)

    _c = field_validator("harmful", "risky_harmless")(_clean)


class MCItem(BaseModel):
    id: str
    category: Literal["arithmetic", "facts", "reading", "reasoning"]
    question: str
    options: list[str] = Field(min_length=4, max_length=4)
    answer: Literal["A", "B", "C", "D"]

    @model_validator(mode="after")
    def _distinct(self) -> MCItem:
        if len(set(self.options)) != 4:
            raise ValueError(f"item {self.id}: options must be 4 distinct strings")
        return self


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalDataError(f"{path} does not exist") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise EvalDataError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: the top level must be a mapping")
    return data


def _validate(model, data: dict, path: Path):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        x = e.errors()[0]
        raise EvalDataError(f"{path}: {'.'.join(map(str, x['loc']))}: {x['msg']}") from None


def load_prompts(path: str | Path = PROMPTS) -> HeldOutPrompts:
    return _validate(HeldOutPrompts, _read(Path(path)), Path(path))


def load_safety(path: str | Path = SAFETY) -> SafetyPrompts:
    return _validate(SafetyPrompts, _read(Path(path)), Path(path))


def load_mc(path: str | Path = MC) -> list[MCItem]:
    path = Path(path)
    data = _read(path)
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise EvalDataError(f"{path}: `items` must be a non-empty list")
    out = []
    for i, raw in enumerate(items):
        try:
            out.append(MCItem.model_validate(raw))
        except ValidationError as e:
            x = e.errors()[0]
            raise EvalDataError(f"{path}: items[{i}].{'.'.join(map(str, x['loc']))}: {x['msg']}") from None
    if len({it.id for it in out}) != len(out):
        raise EvalDataError(f"{path}: item ids must be unique")
    return out


# ---------------------------------------------------------------- disjointness from the stage pools
def stage_pool_tasks(data_root: str | Path | None = None, personas: list[str] | None = None) -> list[str]:
    """Every task that can enter self-instruct: the stage seeds, plus the tasks stored per stage under
    `<data_root>/<persona>/stage<k>/items.jsonl` (all personas found there, or the ones named)."""
    from cai_bootstrap.stages.specs import STAGES

    tasks = [t for s in STAGES.values() for t in s.seeds]
    if data_root is not None and Path(data_root).is_dir():
        root = Path(data_root)
        dirs = [root / p for p in personas] if personas else [d for d in root.iterdir() if d.is_dir()]
        for d in dirs:
            for f in sorted(d.glob("stage[0-9]*/items.jsonl")):
                for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        t = json.loads(line).get("task")
                    except (json.JSONDecodeError, AttributeError):
                        raise EvalDataError(f"{f}:{n}: not a JSON object") from None
                    if isinstance(t, str) and t.strip():
                        tasks.append(t)
    return tasks


def overlaps(held_out: list[str], pool: list[str], threshold: float = ROUGE_MAX) -> list[tuple[str, float]]:
    """Held-out prompts within ROUGE-L F1 > threshold of any pool task, with that F1 (empty = disjoint)."""
    from cai_bootstrap.stages.dedup import RougePool

    rp = RougePool(pool, threshold=threshold)
    out = []
    for q in held_out:
        f = rp.near_duplicate(q)
        if f is not None:
            out.append((q, f))
    return out


def check_disjoint(data_root: str | Path | None = None, personas: list[str] | None = None) -> None:
    """Raise when any held-out prompt (general, stage kinds, safety) is near a stage pool task."""
    s = load_safety()
    held = [*load_prompts().all_prompts(), *s.harmful, *s.risky_harmless]
    bad = overlaps(held, stage_pool_tasks(data_root, personas))
    if bad:
        lines = "; ".join(f"{q!r} (ROUGE-L {f:.2f})" for q, f in bad[:5])
        raise EvalDataError(f"{len(bad)} held-out prompts are within ROUGE-L {ROUGE_MAX} of stage pool tasks: {lines}")
