"""One budget for a run: before a phase starts, the run's spend so far (its ledger) plus the phase's estimate
must fit under the cap, else BudgetStop and nothing of the phase is started. Phases that pay per request (the
judge farm) also reserve each request's worst case under the same cap (judge.limits.Budget)."""

from __future__ import annotations

from cai_bootstrap.core.errors import BudgetStop
from cai_bootstrap.core.ledger import Ledger


def check_budget(ledger: Ledger, run_id: str, cap: float | None, what: str, estimate_usd: float) -> None:
    """Raise BudgetStop when `what` (estimated at `estimate_usd`) would pass `cap` (None: no cap)."""
    if cap is None or estimate_usd <= 0:  # a phase that costs nothing passes no cap (a rerun served from caches)
        return
    spent = ledger.total_usd(run_id)
    if spent + estimate_usd > cap:
        raise BudgetStop(f"budget stop: {what} is estimated at ${estimate_usd:.4f}; with ${spent:.4f} spent that "
                         f"would pass the ${cap:.4f} cap. Nothing was started for it.")
