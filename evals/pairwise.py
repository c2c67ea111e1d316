"""Pairwise win rates with position bias removed: pure functions over judgments.

Every pair (candidate answer, comparator answer) is judged in both orders: order 1 shows the candidate as
A, order 2 shows it as B. `p_ab` is the judge's P(A better) in order 1, `p_ba` its P(A better) in order 2
(where A is the comparator). Each order casts a vote; two votes for the same model decide the pair, two
votes that disagree (the judge picked the same *position* both times) make it a tie, and that position
flip is counted: its rate is the judge's position bias on this data. Win rate = (wins + ties/2) / n.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from cai_bootstrap.analysis.stats import bootstrap_ci

Outcome = Literal["win", "loss", "tie", "invalid"]
SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def vote(p_a: float | None, candidate_is_a: bool) -> int | None:
    """+1 the candidate, -1 the comparator, 0 undecided (exactly 0.5), None no verdict."""
    if p_a is None:
        return None
    if p_a == 0.5:
        return 0
    a_wins = p_a > 0.5
    return 1 if a_wins == candidate_is_a else -1


def outcome(p_ab: float | None, p_ba: float | None) -> tuple[Outcome, bool]:
    """(outcome for the candidate, position_flip). A missing order makes the pair invalid (not counted)."""
    v1, v2 = vote(p_ab, True), vote(p_ba, False)
    if v1 is None or v2 is None:
        return "invalid", False
    if v1 == v2 == 1:
        return "win", False
    if v1 == v2 == -1:
        return "loss", False
    return "tie", v1 != 0 and v2 != 0 and v1 != v2


def _words(s: str) -> int:
    return len(s.split())


def win_rate(judgments: Iterable[dict], seed: int = 0) -> dict:
    """Judgments: {"p_ab", "p_ba", "answer_a" (candidate), "answer_b" (comparator)}.

    Returns win rate with bootstrap 95% interval and n (valid pairs), wins/losses/ties, position flips,
    invalid pairs, and the mean answer length in words of both sides (judges favour longer answers).
    """
    rows = list(judgments)
    counts = {"win": 0, "loss": 0, "tie": 0, "invalid": 0}
    flips, scores, la, lb = 0, [], [], []
    for j in rows:
        o, flip = outcome(j.get("p_ab"), j.get("p_ba"))
        counts[o] += 1
        flips += flip
        if o != "invalid":
            scores.append(SCORE[o])
            la.append(_words(j.get("answer_a") or ""))
            lb.append(_words(j.get("answer_b") or ""))
    est = bootstrap_ci(scores, seed=seed)
    n = len(scores)
    return {
        "win_rate": est.model_dump(), "n": n, "wins": counts["win"], "losses": counts["loss"],
        "ties": counts["tie"], "position_flips": flips, "position_flip_rate": flips / n if n else None,
        "invalid": counts["invalid"],
        "len_candidate": sum(la) / n if n else None, "len_comparator": sum(lb) / n if n else None,
    }


def pair_items(persona: str, stage: int, vs: int, rows: Sequence[dict], cand: dict[str, str],
               comp: dict[str, str]) -> list[dict]:
    """Judge-farm items for stage `stage` vs stage `vs` on the same prompts (answers keyed by prompt id)."""
    return [{"id": f"{persona}:s{stage}-vs-s{vs}:{r['id']}", "persona": persona, "stage": stage, "vs": vs,
             "prompt_id": r["id"], "question": r["question"], "answer_a": cand[r["id"]],
             "answer_b": comp[r["id"]]} for r in rows]
