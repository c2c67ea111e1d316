"""Constitutions: persona principles as YAML, validated by a pydantic schema."""

from cai_bootstrap.constitution.load import (
    ConstitutionError,
    constitution_hash,
    load_constitution,
    parse_constitution,
    principle_hash,
)
from cai_bootstrap.constitution.schema import Constitution, Demonstration, Principle

__all__ = ["Constitution", "ConstitutionError", "Demonstration", "Principle", "constitution_hash",
           "load_constitution", "parse_constitution", "principle_hash"]
