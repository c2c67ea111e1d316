"""Rendezvous (highest-random-weight) hashing of items onto principles.

The principle of round r of an item is the id with the highest sha256(item_key, r, id). Adding a
principle moves only the (item, round) pairs it now wins; removing or editing one touches only the pairs
that were its own. Every other pair keeps its principle, so its cached generations stay valid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def weight(item_key: str, round_: int, principle_id: str) -> bytes:
    return hashlib.sha256(f"{item_key}\x00{round_}\x00{principle_id}".encode()).digest()


def pick_principle(item_key: str, round_: int, principle_ids: Sequence[str]) -> str:
    if not principle_ids:
        raise ValueError("rendezvous hashing needs at least one principle id")
    return max(principle_ids, key=lambda pid: weight(item_key, round_, pid))


def round_principles(item_key: str, rounds: int, principle_ids: Sequence[str]) -> list[str]:
    return [pick_principle(item_key, r, principle_ids) for r in range(rounds)]
