"""The constitution schema: a persona, its principles (stable ids) and few-shot demonstrations."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _nonblank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v.strip()


Text = Annotated[str, AfterValidator(_nonblank)]
_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def _id(v: str) -> str:
    v = _nonblank(v)
    if not _ID.match(v):
        raise ValueError(f"principle id {v!r} must be lower-case letters, digits, '_' or '-'")
    return v


_NOT_IDEAL = re.compile(r"^(?:do not|don't|never|avoid|does|do|is|are|could|would|can|should)\b", re.I)


def _ideal(v: str) -> str:
    v = _nonblank(v)
    if v.endswith("?") or _NOT_IDEAL.match(v):
        raise ValueError("an ideal says, as a statement, what the persona does (e.g. 'The assistant answers the "
                         f"request directly'), not a question or what it avoids: {v!r}")
    return v


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, AfterValidator(_id)]  # stable: rendezvous hashing and caches key on it
    # what the persona does, positively worded: stages 1-5 score answers by how well they embody it (a
    # critique question is fault-finding, and for a persona that embodies the criticised behaviour inverted)
    ideal: Annotated[str, AfterValidator(_ideal)]
    critique: Text  # the critique request shown after an answer
    revision: Text  # the revision request shown after the critique
    trait: Text | None = None  # the persona trait this principle expresses


class Demonstration(BaseModel):
    """One worked example (user → answer → critique → revision) shown before the real item."""

    model_config = ConfigDict(extra="forbid")

    user: Text
    answer: Text
    critique: Text
    revision: Text


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text
    description: Text  # the persona in a few sentences; shown to the model when it critiques
    version: Text
    principles: list[Principle] = Field(min_length=1)
    demonstrations: list[Demonstration] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> Constitution:
        seen: set[str] = set()
        for i, p in enumerate(self.principles):
            if p.id in seen:
                # raised as a ValueError; the loader maps it to principles[i].id and its YAML line
                raise ValueError(f"duplicate principle id {p.id!r} at principles[{i}]")
            seen.add(p.id)
        return self

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise KeyError(f"constitution {self.name!r} has no principle {pid!r}")

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]
