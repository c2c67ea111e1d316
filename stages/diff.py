"""What an edited constitution will regenerate, per stage, with items and dollars, before any spend.

For each stored item (every item of every stage, dropped ones too) it replays the rendezvous hashing over the
new principle ids for the rounds the item ran. The item regenerates from the first round whose principle
moved (added/removed principle) or whose text changed in the fields its stage reads (stages 1-5: the ideal;
stage 6: the critique and revision requests); a changed persona description touches every item, and changed
demonstrations every item of a stage that shows them.

The stages chain: each generates with the previous stage's adapter. So once a stage regenerates any item, it
retrains, and every later stage regenerates all its items (their parent adapter changed) and retrains. That
is an upper bound: if the regenerated items leave a stage's pairs unchanged, its adapter is reused and the
chain stops there.

Dollars: a stage's stored engine seconds in proportion to the tokens regenerated, plus its adapter's stored
training seconds when it retrains, at the profile's price.
"""

from __future__ import annotations

import json
from pathlib import Path

from cai_bootstrap.constitution import Constitution, parse_constitution, principle_hash
from cai_bootstrap.core.errors import MissingInput
from cai_bootstrap.run.layout import Layout
from cai_bootstrap.run.recipe import INTROSPECT_STEP, introspects, steps_of
from cai_bootstrap.stages.rendezvous import pick_principle
from cai_bootstrap.stages.specs import STAGES, get_stage

PARENT = "(parent adapter)"  # the reason of every item of a stage after the first one an edit reaches


NO_IDEAL = "(none: stored before principles had ideals)"  # differs from any new ideal: its items rescore


def load_stored(stage_path: Path) -> tuple[Constitution, list[dict]]:
    import yaml

    path = stage_path / "constitution.yaml"
    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    if isinstance(raw, dict) and any(isinstance(p, dict) and "ideal" not in p for p in raw.get("principles") or []):
        for p in raw["principles"]:
            p.setdefault("ideal", NO_IDEAL)
        text = yaml.safe_dump(raw, sort_keys=False)
    c = parse_constitution(text, path)
    with (stage_path / "items.jsonl").open(encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    return c, items


def first_changed_round(item: dict, old: Constitution, new: Constitution, global_change: bool,
                        fields: tuple[str, ...] | None = None) -> tuple[int, str] | None:
    """(round, principle id responsible) for the first round that must regenerate, or None. `fields`: what of a
    principle the item's stage reads (None: all of it)."""
    pids = item["principle_ids"]
    if global_change and pids:
        return 0, "*"
    new_ids = new.ids
    old_hash = {p.id: principle_hash(p, fields) for p in old.principles}
    new_hash = {p.id: principle_hash(p, fields) for p in new.principles}
    for r, pid in enumerate(pids):
        now = pick_principle(item["key"], r, new_ids)
        if now != pid:
            return r, now if now not in old_hash else pid  # an added principle wins, or `pid` was removed
        if old_hash.get(pid) != new_hash.get(pid):
            return r, pid
    return None


def _changes(old: Constitution, new: Constitution) -> dict[str, str]:
    old_p = {p.id: principle_hash(p) for p in old.principles}
    new_p = {p.id: principle_hash(p) for p in new.principles}
    out = {pid: "added" if pid not in old_p else "removed" if pid not in new_p else "edited"
           for pid in old_p.keys() | new_p.keys() if old_p.get(pid) != new_p.get(pid)}
    if old.description != new.description or old.demonstrations != new.demonstrations:
        out["*"] = "description or demonstrations"
    return out


def every_ideal_changed(old: Constitution, new: Constitution) -> bool:
    """Whether the numbered list of ideals changed (OCT's teacher and introspection read all of it, in order)."""
    return [principle_hash(p, ("ideal",)) for p in old.principles] != [principle_hash(p, ("ideal",))
                                                                       for p in new.principles]


def _stage_plan(k: int, sp: Path, new: Constitution, reached: bool) -> dict:
    """One stage: the items its edit (or, once an earlier stage is reached, its parent adapter) regenerates."""
    spec = get_stage(k)
    old, items = load_stored(sp)
    man = json.loads((sp / "manifest.json").read_text()) if (sp / "manifest.json").is_file() else {}
    shows_demos = spec.pairs == "critique-revise" or not man.get("chat", True)  # base models' respond shows them
    global_change = old.description != new.description or (shows_demos and old.demonstrations != new.demonstrations)
    distill = spec.pairs == "distill"  # every item read every ideal: any change touches all, none touches none
    global_change = global_change or (distill and every_ideal_changed(old, new))
    by: dict[str, dict] = {}
    for it in items:
        hit = ((0, PARENT) if reached else ((0, "*") if global_change else None) if distill
               else first_changed_round(it, old, new, global_change, spec.principle_fields))
        if hit is None:
            continue
        r, pid = hit
        b = by.setdefault(pid, {"items": 0, "estimated_tokens": 0})
        b["items"] += 1
        # from its first changed round on; everything it made when its parent adapter changed
        b["estimated_tokens"] += sum(it["round_tokens"][r:]) if it.get("round_tokens") and not reached \
            else it.get("tokens", 0)
    tokens = sum(b["estimated_tokens"] for b in by.values())
    all_tokens = sum(it.get("tokens", 0) for it in items) or 1
    return {"items": len(items), "items_to_regenerate": sum(b["items"] for b in by.values()),
            "estimated_tokens": tokens, "by_principle": by,
            "reason": PARENT if reached else ("edit" if by else None),
            "engine_seconds": man.get("engine_seconds", 0.0) * tokens / all_tokens}


def plan(data_dir: str | Path, persona: str, new: Constitution, ckpt_dir: str | Path | None = None,
         usd_per_engine_second: float = 0.0) -> dict:
    layout = Layout(Path(data_dir), Path(ckpt_dir)) if ckpt_dir else Layout(data_root=Path(data_dir))
    stages = [(k, layout.stage_data(persona, k)) for k in steps_of(persona, sorted(STAGES))]
    stages = [(k, sp) for k, sp in stages if (sp / "items.jsonl").is_file()]
    if not stages:
        root = layout.stage_data(persona, min(STAGES)).parent
        raise MissingInput(f"no generated data under {root}: run `stage generate` first")
    out = {"persona": persona, "stages": {}, "total_items": 0, "items_to_regenerate": 0, "estimated_tokens": 0,
           "estimated_usd": 0.0, "first_stage_reached": None, "changes": {}}
    for k, sp in stages:
        out["changes"] |= _changes(load_stored(sp)[0], new)
        st = _stage_plan(k, sp, new, reached=out["first_stage_reached"] is not None)
        train = layout.stage_adapter(persona, k) / "manifest.json"
        st["retrains"] = st["items_to_regenerate"] > 0
        train_s = json.loads(train.read_text()).get("wall_s", 0.0) if st["retrains"] and train.is_file() else 0.0
        st["estimated_usd"] = round((st.pop("engine_seconds") + train_s) * usd_per_engine_second, 4)
        if st["retrains"] and out["first_stage_reached"] is None:
            out["first_stage_reached"] = k
        out["stages"][sp.name] = st
        out["total_items"] += st["items"]
        out["items_to_regenerate"] += st["items_to_regenerate"]
        out["estimated_tokens"] += st["estimated_tokens"]
        out["estimated_usd"] = round(out["estimated_usd"] + st["estimated_usd"], 4)
    if introspects(persona) and (layout.introspect_data(persona) / "manifest.json").is_file():
        st = _introspection_plan(layout, persona, load_stored(stages[-1][1])[0], new,
                                 reached=out["first_stage_reached"] is not None, rate=usd_per_engine_second)
        out["stages"][INTROSPECT_STEP] = st
        out["total_items"] += st["items"]
        out["items_to_regenerate"] += st["items_to_regenerate"]
        out["estimated_tokens"] += st["estimated_tokens"]
        out["estimated_usd"] = round(out["estimated_usd"] + st["estimated_usd"], 4)
    return out


def _introspection_plan(layout: Layout, arm: str, old: Constitution, new: Constitution, reached: bool,
                        rate: float) -> dict:
    """A `+introspect` recipe's texts read the description and every ideal, and follow the last preference
    adapter: all of them regenerate, and the SFT adapter retrains, when either changed; none otherwise."""
    man = json.loads((layout.introspect_data(arm) / "manifest.json").read_text())
    texts = man["rows"]["total"] + sum(man["dropped"].values())
    redo = reached or old.description != new.description or every_ideal_changed(old, new)
    sft = layout.introspect_adapter(arm) / "sft" / "manifest.json"
    train_s = json.loads(sft.read_text()).get("wall_s", 0.0) if redo and sft.is_file() else 0.0
    return {"items": texts, "items_to_regenerate": texts if redo else 0,
            "estimated_tokens": sum(man["tokens"].values()) if redo else 0, "by_principle": {},
            "reason": (PARENT if reached else "edit") if redo else None, "retrains": redo,
            "estimated_usd": round(((man.get("engine_seconds", 0.0) if redo else 0.0) + train_s) * rate, 4)}
