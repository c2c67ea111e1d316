"""Guard policy application: per item keep / drop / quarantine from its guard verdicts, with counts.

Pure bookkeeping over records; the guard itself (Llama Guard, or a stand-in) is behind `guard.base.Guard`.
Rules, in order, per verdict: `error` set → drop (fail closed, counted as "guard_error"); `malformed` →
treated as unsafe (category "malformed"); p_unsafe >= policy.threshold → blocked unless every category it
names is outside `policy.block` (no categories named → blocked as "unknown"). A blocked item gets
`policy.mode`. A prompt is judged by its own verdict (a red-team prompt is flagged, not blocked); a pair by
its chosen answer's verdict (an unsafe rejected answer is what a harmlessness pair trains against).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cai_bootstrap.guard.base import Guard, GuardPolicy, Verdict
from cai_bootstrap.guard.policy import decide as policy_decide

_RANK = {"keep": 0, "quarantine": 1, "drop": 2}


def decide(v: Verdict | None, policy: GuardPolicy) -> tuple[str, list[str]]:
    """(action, categories that caused it) for one verdict; the action is `guard.policy.decide`'s."""
    if v is None:
        return "keep", []
    action = policy_decide(v, policy)
    if action == "keep":
        return "keep", []
    if v.error:
        return action, ["guard_error"]
    if v.malformed:
        return action, ["malformed"]
    return action, [c for c in v.categories if c in policy.block] or ["unknown"]


def combine(verdicts: Sequence[Verdict | None], policy: GuardPolicy) -> tuple[str, list[str]]:
    action, cats = "keep", []
    for v in verdicts:
        a, c = decide(v, policy)
        if _RANK[a] > _RANK[action]:
            action, cats = a, c
        elif a == action and a != "keep":
            cats += [x for x in c if x not in cats]
    return action, cats


class GuardCounts:
    """What a filter removed or quarantined, by category: {filter: {action: {category: n}}}."""

    def __init__(self) -> None:
        self.by: dict[str, dict[str, Counter]] = {}

    def add(self, filt: str, action: str, cats: list[str]) -> None:
        if action == "keep":
            return
        c = self.by.setdefault(filt, {}).setdefault(action, Counter())
        for cat in cats or ["unknown"]:
            c[cat] += 1
        c["_items"] += 1

    def as_dict(self) -> dict:
        return {f: {a: dict(c) for a, c in acts.items()} for f, acts in self.by.items()}


def _verdicts(raw: Sequence, n: int, guard: Guard, what: str) -> list[Verdict]:
    if len(raw) != n:
        raise RuntimeError(f"guard {guard.name!r} returned {len(raw)} verdicts for {n} {what}")
    return list(raw)


def guard_prompts(items: list[dict], guard: Guard | None, policy: GuardPolicy, counts: GuardCounts) -> None:
    """Classify every live item's task; drop or quarantine per policy. A red-team prompt is harmful by design:
    its verdict is kept beside it and counted (`red_team_flagged`), and it goes on to be answered and revised.
    Mutates the items."""
    live = [it for it in items if it["status"] == "live"]
    if guard is None or not live:
        return
    verdicts = _verdicts(guard.check_prompts([it["task"] for it in live]), len(live), guard, "prompts")
    for it, v in zip(live, verdicts, strict=True):
        it["guard_prompt"] = v.model_dump(mode="json")
        action, cats = combine([v], policy)
        it["prompt_blocked"] = action != "keep"
        if it["source"] == "red-team" and action != "keep" and not v.error:
            counts.add("prompts", "red_team_flagged", cats)
            continue
        counts.add("prompts", action, cats)
        _apply(it, action, cats, "guard_prompts")


def guard_answers(items: list[dict], guard: Guard | None, policy: GuardPolicy, counts: GuardCounts) -> None:
    """Classify each live item's chosen and rejected answers (as [user, assistant]); the chosen answer's verdict
    decides. An unsafe rejected answer beside a safe chosen one is the pair CAI makes (a harmful original, its
    safe revision): kept, both verdicts stored, counted as `unsafe_rejected_kept`. A guard error on either side
    drops the item (fails closed)."""
    live = [it for it in items if it["status"] in ("live", "quarantined")]
    if guard is None or not live:
        return
    pairs = [(it["task"], it[side]) for it in live for side in ("chosen", "rejected")]
    verdicts = _verdicts(guard.check_answers(pairs), len(pairs), guard, "answers")
    for i, it in enumerate(live):
        vc, vr = verdicts[2 * i], verdicts[2 * i + 1]
        it["guard_chosen"], it["guard_rejected"] = vc.model_dump(mode="json"), vr.model_dump(mode="json")
        action, cats = combine([vc, vr] if vr.error else [vc], policy)
        counts.add("answers", action, cats)
        rejected_action, rejected_cats = decide(vr, policy)
        if action == "keep" and rejected_action != "keep":
            counts.add("answers", "unsafe_rejected_kept", rejected_cats)
        _apply(it, action, cats, "guard_answers")


def _apply(it: dict, action: str, cats: list[str], filt: str) -> None:
    if action == "drop":
        it["status"], it["reason"] = "dropped", f"{filt}:{'guard_error' if 'guard_error' in cats else 'blocked'}"
    elif action == "quarantine" and it["status"] == "live":
        it["status"], it["reason"] = "quarantined", f"{filt}:{','.join(cats)}"
