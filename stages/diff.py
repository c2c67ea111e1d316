"""What an edited constitution will regenerate, computed from the stored items before any spend.

For each stored item (every item of every stage, dropped ones too) it replays the rendezvous hashing
over the new principle ids for the rounds the item ran. The item regenerates from the first round whose
principle moved (added/removed principle) or whose principle's text changed; a changed persona description
or demonstrations touch every item. Estimated tokens = the item's stored tokens from that round on.
"""

from __future__ import annotations

import json
from pathlib import Path

from constitution import Constitution, parse_constitution, principle_hash
from core.errors import MissingInput
from run.layout import Layout
from stages.rendezvous import pick_principle
from stages.specs import STAGES


def load_stored(stage_path: Path) -> tuple[Constitution, list[dict]]:
    c = parse_constitution((stage_path / "constitution.yaml").read_text(encoding="utf-8"),
                           stage_path / "constitution.yaml")
    with (stage_path / "items.jsonl").open(encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    return c, items


def first_changed_round(item: dict, old: Constitution, new: Constitution,
                        global_change: bool) -> tuple[int, str] | None:
    """(round, principle id responsible) for the first round that must regenerate, or None."""
    pids = item["principle_ids"]
    if global_change and pids:
        return 0, "*"
    new_ids = new.ids
    old_hash = {p.id: principle_hash(p) for p in old.principles}
    new_hash = {p.id: principle_hash(p) for p in new.principles}
    for r, pid in enumerate(pids):
        now = pick_principle(item["key"], r, new_ids)
        if now != pid:
            return r, now if now not in old_hash else pid  # an added principle wins, or `pid` was removed
        if old_hash.get(pid) != new_hash.get(pid):
            return r, pid
    return None


def plan(data_dir: str | Path, persona: str, new: Constitution) -> dict:
    layout = Layout(data_root=data_dir)
    stages = [sp for sp in (layout.stage_data(persona, k) for k in sorted(STAGES)) if sp.is_dir()]
    if not stages:
        root = layout.stage_data(persona, min(STAGES)).parent
        raise MissingInput(f"no generated data under {root}: run `generate` first")
    out = {"persona": persona, "stages": {}, "total_items": 0, "items_to_regenerate": 0, "estimated_tokens": 0}
    changes: dict[str, str] = {}
    for sp in stages:
        if not (sp / "items.jsonl").is_file():
            continue
        old, items = load_stored(sp)
        old_p = {p.id: principle_hash(p) for p in old.principles}
        new_p = {p.id: principle_hash(p) for p in new.principles}
        for pid in old_p.keys() | new_p.keys():
            kind = ("added" if pid not in old_p else "removed" if pid not in new_p
                    else "edited" if old_p[pid] != new_p[pid] else None)
            if kind:
                changes[pid] = kind
        demos = [d.model_dump() for d in old.demonstrations], [d.model_dump() for d in new.demonstrations]
        global_change = old.description != new.description or demos[0] != demos[1]
        if global_change:
            changes["*"] = "description or demonstrations"
        by: dict[str, dict] = {}
        n_regen = tokens = 0
        for it in items:
            hit = first_changed_round(it, old, new, global_change)
            if hit is None:
                continue
            r, pid = hit
            t = sum(it["round_tokens"][r:]) if it.get("round_tokens") else it.get("tokens", 0)
            n_regen += 1
            tokens += t
            b = by.setdefault(pid, {"items": 0, "estimated_tokens": 0})
            b["items"] += 1
            b["estimated_tokens"] += t
        out["stages"][sp.name] = {"items": len(items), "items_to_regenerate": n_regen, "estimated_tokens": tokens,
                                  "by_principle": by}
        out["total_items"] += len(items)
        out["items_to_regenerate"] += n_regen
        out["estimated_tokens"] += tokens
    out["changes"] = changes
    return out
