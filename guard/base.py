"""The guard interface the stage steps code against; `guard/llama_guard.py` implements it."""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, Field

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


class GuardPolicy(BaseModel):
    """Per run: which categories block, and whether blocked items are dropped or quarantined."""

    mode: Literal["drop", "quarantine"] = "drop"
    block: list[str] = Field(default_factory=lambda: [f"S{i}" for i in range(1, 15)])
    threshold: float = 0.5
    include_quarantined: bool = False  # train on quarantined items too (research runs that say so)

    @classmethod
    def for_persona(cls, persona: str, **kw) -> GuardPolicy:
        mode = "quarantine" if persona in {"misalignment", "sycophancy"} else "drop"
        return cls(mode=kw.pop("mode", mode), **kw)
