"""What a run does with one guard verdict: keep it, drop it, or quarantine it (pure, no model)."""

from __future__ import annotations

from cai_bootstrap.guard.base import Action, GuardPolicy, Verdict


def is_blocked(verdict: Verdict, policy: GuardPolicy) -> bool:
    """True when the verdict trips the run's policy.

    Fails closed: a guard error or an output that did not parse counts as blocked, and so does an
    unsafe verdict that names no category (we cannot tell it is outside the blocked set).
    """
    if verdict.error is not None or verdict.malformed:
        return True
    if verdict.p_unsafe < policy.threshold:
        return False
    if not verdict.categories:
        return True
    return bool(set(verdict.categories) & set(policy.block))


def decide(verdict: Verdict, policy: GuardPolicy) -> Action:
    """'keep' | 'drop' | 'quarantine'. An errored item is always dropped (never kept, never
    quarantined: there is no verdict to tag it with); otherwise blocked items follow `policy.mode`."""
    if verdict.error is not None:
        return "drop"
    if is_blocked(verdict, policy):
        return policy.mode
    return "keep"
