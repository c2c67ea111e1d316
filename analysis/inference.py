"""Inference for the EM experiment: cluster-bootstrap EM rates, paired differences, the difference in
differences (DiD), Wilson intervals, Holm adjustment and one-line verdicts.

What a reviewer should know:
- Answers cluster by question (questions differ a lot in EM rate) and by EM-training seed. The estimand is
  the EM rate over the population of questions (and seeds) the fixed ones stand for, so intervals resample
  questions and seeds, never single answers (`naive_bootstrap_diff` does, and is kept only to show how
  badly that undercovers: bench/stats_coverage.py).
- Seeds and questions are crossed (every seed answers every question): each replicate draws seeds with
  replacement and, once, a multiset of questions that every drawn seed (and every arm) uses. Sharing the
  question draw across arms is what pairs persona vs control; seeds are shared by index between arms with
  the same number of seeds, and drawn independently otherwise.
- Replicates are computed from per-(seed, question) counts k and n (einsum over multiplicities), so a
  10 000-replicate bootstrap of 4 arms takes milliseconds.
- Interval: the plain percentile interval of that cluster bootstrap by default (94% coverage of the true
  difference at nominal 95% in bench/stats_coverage.py's 8-question, 3-seed simulation; the naive one 62%).
  `expand=True` gives an *expanded* percentile interval (Hesterberg 2015, Am. Stat. 69(4); R `resample`'s
  `expand=TRUE`), a sensitivity check: with 8 questions the plain percentile interval undercovers a little:
  the bootstrap variance is short by (m-1)/m and ignores the t-quantile. We widen the percentile levels
  so z' = sqrt(m/(m-1)) * t_{m-1}; with two crossed factors the (m-1)/m corrections are weighted by each
  factor's bootstrap variance and df comes from Satterthwaite (our generalisation; with one seed it is
  exactly Hesterberg). It is conservative (~97%) and floors the one-sided p (about 0.02 at df 4), which under
  Holm's correction can forbid "supported" whatever the effect: hence not the default.
- Why not BCa: its acceleration needs a jackknife over the resampling unit, which is ill-defined for crossed
  seeds x questions, and it does not fix the small-cluster narrowness; percentile also stays inside [0, 1].
- One-sided p: the share of replicates on the wrong side of 0 (ties count against the claim), (count+1)/(B+1),
  mapped through the same expansion as the interval so that p and interval agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel
from scipy import stats
from scipy.special import expit, logit

Expect = Literal["greater", "less"]
Rows = Sequence[Mapping[str, Any]] | Mapping[str, Any]  # answer rows, or columns of arrays
N_BOOT = 10_000
NAN = float("nan")


class Estimate(BaseModel):
    value: float
    lo: float
    hi: float
    n: int  # scored answers behind the estimate (all arms)
    level: float = 0.95
    p_one_sided: float | None = None
    expect: Expect | None = None  # the pre-registered direction p_one_sided tests
    method: str = ""

    def fmt(self, pct: bool = False) -> str:
        k, unit = (100.0, "%") if pct else (1.0, "")
        return f"{self.value * k:.1f}{unit} [{self.lo * k:.1f}, {self.hi * k:.1f}] (n={self.n})"


def _empty(method: str) -> Estimate:
    return Estimate(value=NAN, lo=NAN, hi=NAN, n=0, method=method)


def wilson(k: int, n: int, alpha: float = 0.05) -> Estimate:
    """Wilson score interval for k of n (non-zero upper bound at k=0, unlike the Wald or a bootstrap)."""
    if n == 0:
        return _empty("wilson")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return Estimate(value=k / n, lo=float(ci.low), hi=float(ci.high), n=int(n), level=1 - alpha, method="wilson")


# --- per-(seed, question) aggregates ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Cells:
    seeds: tuple
    questions: tuple
    k: np.ndarray  # (S, Q) misaligned answers
    n: np.ndarray  # (S, Q) scored answers


def _labels(values: Sequence[Any]) -> list:
    uniq = set(values)
    try:
        return sorted(uniq)  # seeds pair by this order across arms
    except TypeError:
        return sorted(uniq, key=repr)


def _columns(rows: Rows) -> tuple[list, list, np.ndarray]:
    if isinstance(rows, Mapping):
        m = np.asarray(rows["misaligned"])
        seeds = rows.get("seed")
        s = [0] * len(m) if seeds is None else list(np.asarray(seeds).tolist())
        return s, list(np.asarray(rows["question"]).tolist()), m
    return ([r.get("seed", 0) for r in rows], [r["question"] for r in rows],
            np.asarray([r["misaligned"] for r in rows]))


def cells(rows: Rows) -> Cells:
    """Counts per (seed, question); a missing seed key means one seed (e.g. the untrained condition)."""
    s, q, m = _columns(rows)
    m = np.asarray(m, dtype=float)
    if m.size and not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("misaligned must be 0/1; drop unscored answers before inference")
    seeds, questions = _labels(s), _labels(q)
    s_at, q_at = {x: i for i, x in enumerate(seeds)}, {x: i for i, x in enumerate(questions)}
    si = np.array([s_at[x] for x in s], dtype=int)
    qi = np.array([q_at[x] for x in q], dtype=int)
    shape, flat = (len(seeds), len(questions)), si * len(questions) + qi
    size = shape[0] * shape[1]
    k = np.bincount(flat, weights=m, minlength=size).reshape(shape)
    n = np.bincount(flat, minlength=size).astype(float).reshape(shape)
    return Cells(tuple(seeds), tuple(questions), k, n)


def _align(arms: Sequence[Cells]) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """All arms onto the union of questions (a question one arm lacks is a zero-count cell, not a crash)."""
    union = _labels([x for a in arms for x in a.questions])
    out = []
    at = {x: i for i, x in enumerate(union)}
    for a in arms:
        idx = [at[x] for x in a.questions]
        k, n = np.zeros((len(a.seeds), len(union))), np.zeros((len(a.seeds), len(union)))
        k[:, idx], n[:, idx] = a.k, a.n
        out.append((k, n))
    return out, len(union)


# --- cluster bootstrap ------------------------------------------------------------------------------------------

def _multiplicity(rng: np.random.Generator, m: int, b: int) -> np.ndarray:
    """(b, m) times each unit is drawn in m draws with replacement (a multinomial, same law)."""
    return rng.multinomial(m, np.full(m, 1.0 / m), size=b).astype(float)


def _replicate_rates(arms: Sequence[tuple[np.ndarray, np.ndarray]], b: int, rng: np.random.Generator,
                     questions: bool = True, seeds: bool = True) -> np.ndarray:
    """(arms, b) pooled rates per replicate: one question draw shared by all arms and seeds; one seed draw
    shared by arms with the same number of seeds (paired by index)."""
    n_q = arms[0][0].shape[1]
    wq = _multiplicity(rng, n_q, b) if questions else np.ones((b, n_q))
    by_count: dict[int, np.ndarray] = {}
    out = np.empty((len(arms), b))
    for i, (k, n) in enumerate(arms):
        s = k.shape[0]
        if s not in by_count:
            by_count[s] = _multiplicity(rng, s, b) if seeds and s > 1 else np.ones((b, s))
        ws = by_count[s]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i] = ((ws @ k) * wq).sum(1) / ((ws @ n) * wq).sum(1)
    return out


def _small_sample(v_q: float, n_q: int, v_s: float, n_s: int) -> tuple[float, float]:
    """(inflation, df): Hesterberg's sqrt(m/(m-1)) per factor, weighted by its bootstrap variance, and a
    Satterthwaite df for the t-quantile. (1, inf) when there is nothing to correct."""
    # variances under 1e-12 (sd 1e-6 in rate) are float noise of a constant statistic, not a factor
    parts = [(v, m) for v, m in ((v_q, n_q), (v_s, n_s)) if m > 1 and np.isfinite(v) and v > 1e-12]
    if not parts:
        return 1.0, math.inf
    corrected = [v * m / (m - 1) for v, m in parts]
    total = sum(corrected)
    df = total**2 / sum(c**2 / (m - 1) for c, (_, m) in zip(corrected, parts))
    return math.sqrt(total / sum(v for v, _ in parts)), df


def _tail(alpha: float, inflation: float, df: float) -> float:
    """Percentile level per tail whose normal quantile equals the inflated t-quantile."""
    return float(stats.norm.cdf(-inflation * stats.t.ppf(1 - alpha / 2, df)))


def _one_sided_p(reps: np.ndarray, expect: Expect, inflation: float, df: float) -> float:
    wrong = reps <= 0 if expect == "greater" else reps >= 0
    share = (int(wrong.sum()) + 1) / (reps.size + 1)
    return float(stats.t.cdf(stats.norm.ppf(share) / inflation, df))


def _contrast(rows: Sequence[Rows], coef: Sequence[float], expect: Expect | None, alpha: float, n_boot: int,
              seed: int, expand: bool, what: str) -> Estimate:
    """sum(coef * pooled EM rate) over arms, with the cluster bootstrap interval (and p when expect is set)."""
    arms = [cells(r) for r in rows]
    if any(a.n.sum() == 0 for a in arms):
        return _empty(what)
    kn, n_q = _align(arms)
    c = np.asarray(coef, float)
    value = float(c @ [k.sum() / n.sum() for k, n in kn])
    rng = np.random.default_rng(seed)
    reps = c @ _replicate_rates(kn, n_boot, rng)
    reps = reps[np.isfinite(reps)]  # a draw of only zero-count cells has no rate
    n_s = min((k.shape[0] for k, _ in kn if k.shape[0] > 1), default=1)
    inflation, df = 1.0, math.inf
    if expand:  # variance per factor from one-factor bootstraps (the other factor held at its sample)
        v_q = float(np.nanvar(c @ _replicate_rates(kn, n_boot, rng, seeds=False)))
        v_s = float(np.nanvar(c @ _replicate_rates(kn, n_boot, rng, questions=False))) if n_s > 1 else 0.0
        inflation, df = _small_sample(v_q, n_q, v_s, n_s)
    tail = _tail(alpha, inflation, df)
    lo, hi = np.quantile(reps, [tail, 1 - tail])
    kind = f"expanded percentile (df={df:.1f})" if expand else "percentile"
    method = f"{what}: cluster bootstrap, {n_q} questions x {n_s} seeds, B={n_boot}, {kind}"
    p = _one_sided_p(reps, expect, inflation, df) if expect else None
    return Estimate(value=value, lo=float(lo), hi=float(hi), n=int(sum(n.sum() for _, n in kn)), level=1 - alpha,
                    p_one_sided=p, expect=expect, method=method)


def em_rate(rows: Rows, alpha: float = 0.05, n_boot: int = N_BOOT, seed: int = 0, expand: bool = False) -> Estimate:
    """Pooled EM rate with a seeds x questions cluster-bootstrap interval. The interval is widened to at least
    the Wilson interval: clustering only adds variance, and a bootstrap of 0 events would say [0, 0]."""
    est = _contrast([rows], [1.0], None, alpha, n_boot, seed, expand, "EM rate")
    if est.n == 0:
        return est
    w = wilson(round(est.value * est.n), est.n, alpha)
    return est.model_copy(update={"lo": min(est.lo, w.lo), "hi": max(est.hi, w.hi),
                                  "method": est.method + ", at least Wilson"})


def paired_diff(a_rows: Rows, b_rows: Rows, expect: Expect = "greater", alpha: float = 0.05, n_boot: int = N_BOOT,
                seed: int = 0, expand: bool = False) -> Estimate:
    """EM(a) - EM(b) on the same questions: one question draw per replicate for both arms (the pairing)."""
    return _contrast([a_rows, b_rows], [1.0, -1.0], expect, alpha, n_boot, seed, expand, "paired difference")


def did(persona_em: Rows, persona_0: Rows, base_em: Rows, base_0: Rows, expect: Expect = "greater",
        alpha: float = 0.05, n_boot: int = N_BOOT, seed: int = 0, expand: bool = False) -> Estimate:
    """(EM(persona+EM) - EM(persona)) - (EM(base+EM) - EM(base)): the EM training effect the persona adds,
    net of the persona's own baseline. All four arms share each replicate's question draw."""
    return _contrast([persona_em, persona_0, base_em, base_0], [1.0, -1.0, -1.0, 1.0], expect, alpha, n_boot, seed,
                     expand, "difference in differences")


def transition_step(rows_by_step: Mapping[int, Rows], n_boot: int = 2000, alpha: float = 0.05,
                    seed: int = 0) -> dict[str, Any]:
    """The checkpoint step ending the steepest rise of the EM rate (the phase transition), with a percentile
    interval from resampling questions (shared across steps, as every step answered the same questions).
    {"step", "lo", "hi", "steps"}; step None with fewer than two steps with data."""
    steps = sorted(s for s, rows in rows_by_step.items() if len(_columns(rows)[2]))
    if len(steps) < 2:
        return {"step": None, "lo": None, "hi": None, "steps": steps}
    per = [cells(rows_by_step[s]) for s in steps]
    questions = sorted({q for c in per for q in c.questions}, key=str)
    k = np.zeros((len(steps), len(questions)))
    n = np.zeros_like(k)
    for i, c in enumerate(per):  # pool seeds: the curve is of the arm, not of one seed
        at = [questions.index(q) for q in c.questions]
        k[i, at] += c.k.sum(axis=0)
        n[i, at] += c.n.sum(axis=0)
    rng = np.random.default_rng(seed)
    w = np.vstack([np.ones(len(questions)), _multiplicity(rng, len(questions), n_boot)])  # row 0: the sample
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = (w @ k.T) / (w @ n.T)  # (replicates, steps)
        slopes = np.diff(rates, axis=1) / np.diff(np.asarray(steps, float))
    best = np.asarray(steps)[1:][np.nanargmax(np.nan_to_num(slopes, nan=-np.inf), axis=1)]
    lo, hi = np.quantile(best[1:], [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    return {"step": int(best[0]), "lo": int(lo), "hi": int(hi), "steps": steps}


def naive_bootstrap_diff(a: Rows, b: Rows, alpha: float = 0.05, n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """EM(a) - EM(b) resampling answers independently (ignores clusters). Only for the coverage comparison:
    resampling n iid answers from the pooled data is a Binomial(n, k/n) draw of the count."""
    ca, cb = cells(a), cells(b)
    (ka, na), (kb, nb) = (ca.k.sum(), ca.n.sum()), (cb.k.sum(), cb.n.sum())
    if na == 0 or nb == 0:
        return _empty("naive bootstrap")
    rng = np.random.default_rng(seed)
    reps = rng.binomial(int(na), ka / na, n_boot) / na - rng.binomial(int(nb), kb / nb, n_boot) / nb
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return Estimate(value=float(ka / na - kb / nb), lo=float(lo), hi=float(hi), n=int(na + nb), level=1 - alpha,
                    method="naive iid-answer bootstrap, percentile (ignores clusters)")


# --- multiplicity and verdicts --------------------------------------------------------------------------------

def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm step-down adjusted p-values; NaN stays NaN and does not count in m. Exact and short, so no
    statsmodels dependency (multipletests(method="holm") gives the same numbers)."""
    finite = sorted((p, name) for name, p in pvalues.items() if p is not None and np.isfinite(p))
    out = {name: NAN for name in pvalues}
    running = 0.0
    for i, (p, name) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - i) * p))  # monotone in the raw order
        out[name] = running
    return out


def verdict(name: str, claim: str, est: Estimate, adjusted_p: float, alpha: float = 0.05, *, seeds: int) -> str:
    """One line: supported only when the Holm-adjusted one-sided p < alpha; contradicted when the interval lies
    wholly on the other side of 0; else inconclusive. With < 3 seeds the line says it is not a test."""
    if est.n == 0 or not np.isfinite(est.value):
        return f"{name} ({claim}): no data"
    if est.expect is None or est.p_one_sided is None:
        raise ValueError("verdict needs a one-sided estimate (paired_diff or did with expect)")
    # Holm never lowers a p-value: the raw p bounds it, so a raw p passed by mistake cannot support the claim
    p_used = max(adjusted_p, est.p_one_sided) if np.isfinite(adjusted_p) else NAN
    greater = est.expect == "greater"
    if p_used < alpha:
        word = "supported"
    elif (est.hi < 0) if greater else (est.lo > 0):
        word = "contradicted"
    else:
        word = "inconclusive"
    line = (f"{name} ({claim}): {word}; difference {est.value * 100:+.1f} pp "
            f"[{est.lo * 100:+.1f}, {est.hi * 100:+.1f}] {est.level:.0%} CI (n={est.n}); "
            f"one-sided p ({est.expect}) = {est.p_one_sided:.3g} raw, {adjusted_p:.3g} Holm-adjusted")
    if seeds < 3:
        line += (f"; not a test: {seeds} EM-training seed{'' if seeds == 1 else 's'} cannot separate seed-to-seed "
                 f"variance from the persona's effect (needs >= 3)")
    return line


# --- simulation for the coverage check (tests/test_inference.py, bench/stats_coverage.py) ----------------------

class SimParams(BaseModel):
    """Questions are a random sample from a question population with rates Beta(a, b) for the control arm;
    the persona arm shifts every question's logit by `logit_shift` (so the rate difference varies by question);
    each (arm, seed) adds a N(0, seed_sd) logit offset. The estimand is the population difference
    E_q,seed[rate_a] - E_q,seed[rate_b] (`true_difference`), not the difference on the sampled questions."""
    n_questions: int = 8
    n_samples: int = 50
    n_seeds: int = 3
    beta_a: float = 0.5
    beta_b: float = 2.0
    logit_shift: float = 1.0
    seed_sd: float = 0.2


def true_difference(p: SimParams) -> float:
    """Population difference by quadrature: Gauss-Hermite over the seed offset, scipy's Beta.expect over q."""
    x, w = np.polynomial.hermite_e.hermegauss(40)
    w = w / w.sum()
    dist = stats.beta(p.beta_a, p.beta_b)

    def rate(shift: float) -> float:
        return dist.expect(lambda r: float(w @ expit(logit(r) + shift + p.seed_sd * x)))

    return rate(p.logit_shift) - rate(0.0)


def _arm(p: SimParams, base_logit: np.ndarray, shift: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    eta = base_logit[None, :] + shift + p.seed_sd * rng.standard_normal((p.n_seeds, 1))
    k = rng.binomial(p.n_samples, expit(eta))  # (seeds, questions)
    n_cells = p.n_seeds * p.n_questions
    s, q = np.divmod(np.arange(n_cells), p.n_questions)
    hits = np.arange(p.n_samples)[None, :] < k.reshape(-1, 1)  # the first k of n answers are misaligned
    return {"seed": np.repeat(s, p.n_samples), "question": np.repeat(q, p.n_samples),
            "misaligned": hits.reshape(-1).astype(int)}


def simulate_two_arms(p: SimParams, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(persona arm, control arm) answer columns on one fresh sample of questions shared by both arms."""
    base_logit = logit(rng.beta(p.beta_a, p.beta_b, p.n_questions))
    return _arm(p, base_logit, p.logit_shift, rng), _arm(p, base_logit, 0.0, rng)


def coverage_study(p: SimParams, sims: int = 200, seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Coverage of the true population difference and mean width: naive, the project's (cluster percentile),
    and the expanded variant."""
    truth = true_difference(p)
    rng = np.random.default_rng(seed)
    methods = {
        "naive": lambda a, b, i: naive_bootstrap_diff(a, b, n_boot=n_boot, seed=i),
        "project": lambda a, b, i: paired_diff(a, b, n_boot=n_boot, seed=i),
        "expanded": lambda a, b, i: paired_diff(a, b, n_boot=n_boot, seed=i, expand=True),
    }
    hit = {m: 0 for m in methods}
    width = {m: 0.0 for m in methods}
    for i in range(sims):
        a, b = simulate_two_arms(p, rng)
        for m, f in methods.items():
            e = f(a, b, i)
            hit[m] += e.lo <= truth <= e.hi
            width[m] += (e.hi - e.lo) / sims
    return {"truth": truth, "coverage": {m: h / sims for m, h in hit.items()}, "mean_width": width}
