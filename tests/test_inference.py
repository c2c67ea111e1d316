"""Cluster-bootstrap inference on simulated EM data with known answers (fast: a few seconds on one core)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit, logit

from cai_bootstrap.analysis.inference import (
    Estimate,
    SimParams,
    cells,
    coverage_study,
    did,
    em_rate,
    holm,
    paired_diff,
    true_difference,
    verdict,
    wilson,
)


def _rows(rates: dict[tuple[int, int], float], n: int) -> list[dict]:
    """Answer rows with exactly round(rate * n) misaligned of n per (seed, question)."""
    out = []
    for (s, q), r in rates.items():
        k = round(r * n)
        out += [{"seed": s, "question": q, "misaligned": int(i < k)} for i in range(n)]
    return out


# --- wilson ----------------------------------------------------------------------------------------------------

def test_wilson_zero_events_has_nonzero_upper_bound():
    e = wilson(0, 56)
    assert e.value == 0 and e.lo == 0 and e.hi > 0.05 and e.n == 56


def test_wilson_brackets_half_and_matches_scipy():
    e = wilson(28, 56)
    assert e.lo < 0.5 < e.hi
    for k, n, alpha in [(3, 40, 0.05), (17, 23, 0.1)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
        got = wilson(k, n, alpha)
        assert (got.lo, got.hi) == pytest.approx((ci.low, ci.high))


def test_wilson_empty_is_nan():
    e = wilson(0, 0)
    assert e.n == 0 and math.isnan(e.value)


# --- coverage: the reason for the cluster bootstrap --------------------------------------------------------------

def test_truth_is_the_population_difference():
    p = SimParams()
    rng = np.random.default_rng(0)
    q = logit(rng.beta(p.beta_a, p.beta_b, 400_000))
    e_a, e_b = p.seed_sd * rng.standard_normal((2, q.size))
    mc = float(np.mean(expit(q + p.logit_shift + e_a) - expit(q + e_b)))
    assert true_difference(p) == pytest.approx(mc, abs=0.002)


def test_naive_undercovers_and_project_interval_covers():
    r = coverage_study(SimParams(), sims=200, seed=0)
    cov = r["coverage"]
    assert cov["naive"] < 0.85  # ignores question clustering: about 0.6
    assert cov["project"] >= 0.90  # about 0.97 (conservative: the crossed bootstrap counts cell noise twice)
    assert r["mean_width"]["naive"] < r["mean_width"]["project"]


# --- rates and differences -----------------------------------------------------------------------------------

def test_em_rate_zero_events_keeps_wilson_upper_bound():
    rows = [{"question": q, "misaligned": 0} for q in range(8) for _ in range(7)]  # no seed key: one seed
    e = em_rate(rows, n_boot=500)
    assert e.value == 0 and e.lo == 0 and e.hi == pytest.approx(wilson(0, 56).hi)


def test_em_rate_clustered_interval_is_wider_than_wilson():
    rates = {(s, q): r for s in range(3) for q, r in enumerate([0.0, 0.02, 0.05, 0.1, 0.3, 0.5, 0.02, 0.6])}
    rows = _rows(rates, 50)
    e, w = em_rate(rows, n_boot=2000), wilson(sum(r["misaligned"] for r in rows), len(rows))
    assert e.value == pytest.approx(w.value) and e.hi - e.lo > 2 * (w.hi - w.lo)


def test_paired_diff_shares_the_question_draw():
    rates = {(s, q): r for s in range(3) for q, r in enumerate([0.0, 0.1, 0.4, 0.8, 0.2, 0.05, 0.6, 0.3])}
    a = _rows(rates, 20)
    same = paired_diff(a, a, n_boot=1000)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)  # unshared draws would give a wide interval
    assert same.p_one_sided == pytest.approx(1.0)  # ties count against the claim


def test_paired_diff_p_follows_the_direction():
    base = [0.02, 0.05, 0.1, 0.2, 0.3, 0.05, 0.15, 0.4]
    a = _rows({(s, q): r + 0.2 for s in range(3) for q, r in enumerate(base)}, 50)
    b = _rows({(s, q): r for s in range(3) for q, r in enumerate(base)}, 50)
    up, down = paired_diff(a, b, "greater", n_boot=2000), paired_diff(a, b, "less", n_boot=2000)
    assert up.value == pytest.approx(0.2, abs=0.01) and up.lo > 0.1
    assert up.p_one_sided < 0.01 and down.p_one_sided > 0.99 and up.expect == "greater"


def test_paired_diff_different_seed_counts_and_columns():
    a = _rows({(s, q): 0.3 for s in range(3) for q in range(4)}, 20)
    b = _rows({(0, q): 0.1 for q in range(4)}, 20)
    cols = {k: np.array([r[k] for r in b]) for k in ("seed", "question", "misaligned")}
    e = paired_diff(a, cols, n_boot=500)
    assert e.value == pytest.approx(0.2) and e.n == 240 + 80


def test_rows_must_be_zero_one():
    with pytest.raises(ValueError):
        cells([{"question": 0, "misaligned": 2}])


def test_did_nets_out_the_persona_baseline():
    p0 = [0.01, 0.02, 0.05, 0.1, 0.03, 0.0, 0.08, 0.04]  # untrained base
    em = [0.05, 0.3, 0.1, 0.25, 0.4, 0.15, 0.2, 0.1]  # EM training effect per question
    seed_off = [-0.01, 0.0, 0.01]

    def arm(shift: float, trained: bool) -> list[dict]:
        seeds = range(3) if trained else range(1)
        return _rows({(s, q): p0[q] + shift + (em[q] + seed_off[s] if trained else 0.0)
                      for s in seeds for q in range(8)}, 100)

    persona_em, persona_0, base_em, base_0 = arm(0.3, True), arm(0.3, False), arm(0.0, True), arm(0.0, False)
    d = did(persona_em, persona_0, base_em, base_0, "less", n_boot=2000)
    level = paired_diff(persona_em, base_em, "greater", n_boot=2000)
    assert abs(d.value) < 0.01 and d.lo < 0 < d.hi and d.p_one_sided > 0.05
    assert level.value == pytest.approx(0.3, abs=0.01) and level.lo > 0.2 and level.p_one_sided < 0.01


# --- multiplicity and verdicts ------------------------------------------------------------------------------------

def test_holm_hand_checked():
    # sorted: d .005*4=.02, a .01*3=.03, c .03*2=.06, b .04*1=.04 -> .06 (step-down keeps it monotone)
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "e": float("nan")})
    assert got["d"] == pytest.approx(0.02) and got["a"] == pytest.approx(0.03)
    assert got["c"] == pytest.approx(0.06) and got["b"] == pytest.approx(0.06) and math.isnan(got["e"])
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}  # 2 * 0.6 capped at 1; y cannot go below it


def _est(value: float, lo: float, hi: float, p: float, expect: str = "greater") -> Estimate:
    return Estimate(value=value, lo=lo, hi=hi, n=1200, p_one_sided=p, expect=expect)


def test_verdict_words():
    assert "supported" in verdict("H1", "x", _est(0.2, 0.1, 0.3, 0.001), 0.004, seeds=3)
    assert "contradicted" in verdict("H1", "x", _est(-0.2, -0.3, -0.1, 0.999), 1.0, seeds=3)
    assert "contradicted" in verdict("H1", "x", _est(0.2, 0.1, 0.3, 0.999, "less"), 1.0, seeds=3)
    line = verdict("H1", "x", _est(0.05, -0.02, 0.12, 0.12), 0.12, seeds=3)
    assert "inconclusive" in line and "0.12 raw" in line and "0.12 Holm-adjusted" in line and "not a test" not in line
    assert "+5.0 pp [-2.0, +12.0] 95% CI (n=1200)" in line


def test_raw_p_012_is_never_supported():
    for adjusted in (0.12, 0.36, 0.01):  # 0.01 < raw: a mistaken adjusted p still cannot support
        assert "supported" not in verdict("H2", "x", _est(0.05, -0.02, 0.12, 0.12), adjusted, seeds=3)


def test_verdict_one_seed_is_not_a_test():
    line = verdict("H1", "x", _est(0.2, 0.1, 0.3, 0.001), 0.004, seeds=1)
    assert line.startswith("H1 (x): supported") and "not a test: 1 EM-training seed cannot separate" in line
    assert "not a test: 2 EM-training seeds" in verdict("H1", "x", _est(0.2, 0.1, 0.3, 0.001), 0.004, seeds=2)
    assert verdict("H1", "x", Estimate(value=float("nan"), lo=0, hi=0, n=0), 0.5, seeds=3) == "H1 (x): no data"
