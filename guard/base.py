"""The guard interface the stage steps code against; `guard/llama_guard.py` implements it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["keep", "drop", "quarantine"]


class Verdict(BaseModel):
    unsafe: bool
    p_unsafe: float
    categories: list[str] = Field(default_factory=list)  # e.g. ["S1", "S10"]
    guard: str  # profile name of the guard model that judged
    stand_in: bool = False  # True when a small model stood in for Llama Guard (CPU runs)
    error: str | None = None  # the guard failed on this item: it is excluded (fails closed)
    malformed: bool = False  # the guard's output did not parse: treated as unsafe


class Guard(Protocol):
    name: str

    def check_prompts(self, prompts: list[str]) -> list[Verdict]: ...

    def check_answers(self, pairs: list[tuple[str, str]]) -> list[Verdict]: ...


POLICY_FILE = Path(__file__).with_name("policy.yaml")


class GuardPolicy(BaseModel):
    """Per run: which categories block, and whether blocked items are dropped or quarantined. Built by hand it
    blocks every category; a run's comes from a policy file (`for_persona`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["drop", "quarantine"] = "drop"
    block: list[str] = Field(default_factory=lambda: [f"S{i}" for i in range(1, 15)])
    threshold: float = Field(0.5, ge=0, le=1)
    include_quarantined: bool = False  # train on quarantined items too (research runs that say so)

    @classmethod
    def for_persona(cls, persona: str, path: str | Path | None = None, **kw) -> GuardPolicy:
        """The policy file's keys (default guard/policy.yaml), its overrides for `persona`, then `kw`. A bad file
        is BadInput naming it and the key."""
        import yaml
        from pydantic import ValidationError

        from cai_bootstrap.core.errors import BadInput, field_errors

        path = Path(path) if path else POLICY_FILE
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise BadInput(f"guard policy {path}: cannot be read as YAML ({e})") from None
        if not isinstance(raw, dict):
            raise BadInput(f"guard policy {path}: expected a mapping of {', '.join(cls.model_fields)} and personas")
        personas = raw.pop("personas", None) or {}
        try:
            return cls.model_validate(raw | (personas.get(persona) or {}) | kw)
        except (ValidationError, TypeError) as e:
            why = field_errors(e) if isinstance(e, ValidationError) else str(e)
            raise BadInput(f"guard policy {path} (persona {persona}): {why}") from None
