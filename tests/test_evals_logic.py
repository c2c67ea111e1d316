"""Per-stage evaluation: pure logic (position swap, ties, capability flags, refusals) and the held-out data."""

from __future__ import annotations

import json

import pytest

from cai_bootstrap.core.refusal import is_refusal
from cai_bootstrap.evals.data import EvalDataError, load_mc, load_prompts, load_safety, overlaps, stage_pool_tasks
from cai_bootstrap.evals.pairwise import outcome, pair_items, win_rate
from cai_bootstrap.evals.run import capability_metrics, parse_stages, safety_metrics


def J(p_ab, p_ba, a="one two", b="one two three four"):
    return {"p_ab": p_ab, "p_ba": p_ba, "answer_a": a, "answer_b": b}


def test_outcome_both_orders():
    # order 1: candidate is A; order 2: candidate is B (p_ba is P(A) with the comparator as A)
    assert outcome(0.9, 0.2) == ("win", False)
    assert outcome(0.1, 0.8) == ("loss", False)
    assert outcome(0.9, 0.9) == ("tie", True)  # the judge picked position A both times: a flip, a tie
    assert outcome(0.2, 0.3) == ("tie", True)  # position B both times
    assert outcome(0.5, 0.2) == ("tie", False)  # one order undecided: tie, not a flip
    assert outcome(None, 0.2) == ("invalid", False)


def test_win_rate_exact_on_hand_made_judgments():
    js = [J(0.9, 0.1), J(0.8, 0.3), J(0.2, 0.7), J(0.9, 0.9), J(0.3, 0.1), J(0.5, 0.5), J(None, 0.4)]
    r = win_rate(js)
    # wins: 2, losses: 1, ties: 3 (two flips + one undecided both ways), invalid: 1 → (2 + 1.5) / 6
    assert (r["wins"], r["losses"], r["ties"], r["position_flips"], r["invalid"], r["n"]) == (2, 1, 3, 2, 1, 6)
    assert r["win_rate"]["value"] == pytest.approx(3.5 / 6)
    assert r["position_flip_rate"] == pytest.approx(2 / 6)
    assert r["win_rate"]["lo"] <= 3.5 / 6 <= r["win_rate"]["hi"] and r["win_rate"]["n"] == 6
    assert (r["len_candidate"], r["len_comparator"]) == (2.0, 4.0)


def test_win_rate_swapping_sides_mirrors():
    js = [J(0.9, 0.1), J(0.8, 0.3), J(0.2, 0.7), J(0.9, 0.9)]
    # the comparator's view of the same pairs: it is A in order 2, i.e. (p_ab, p_ba) swap roles
    mirrored = [J(j["p_ba"], j["p_ab"]) for j in js]
    a, b = win_rate(js)["win_rate"]["value"], win_rate(mirrored)["win_rate"]["value"]
    assert a == pytest.approx(2.5 / 4) and a + b == pytest.approx(1.0)


def test_all_flips_is_half_and_unanimous_is_one():
    assert win_rate([J(0.99, 0.99)] * 5)["win_rate"]["value"] == 0.5
    r = win_rate([J(0.7, 0.2)] * 5)
    assert r["win_rate"]["value"] == 1.0 and r["position_flips"] == 0
    assert win_rate([])["n"] == 0


def test_pair_items_carry_candidate_as_a():
    rows = [{"id": "g000", "question": "q?"}]
    it = pair_items("hhh", 3, 2, rows, {"g000": "cand"}, {"g000": "comp"})[0]
    assert (it["answer_a"], it["answer_b"], it["stage"], it["vs"]) == ("cand", "comp", 3, 2)


def test_capability_drop_flag_is_paired():
    base = {"per_item": [{"id": str(i), "correct": 1.0} for i in range(30)], "tasks": {}}
    same = {"per_item": [{"id": str(i), "correct": 1.0} for i in range(30)], "tasks": {}}
    worse = {"per_item": [{"id": str(i), "correct": float(i % 3 == 0)} for i in range(30)], "tasks": {}}
    m = capability_metrics({0: base, 1: same, 2: worse})
    assert m[1]["drop_flag_vs_base"] is False and m[1]["change_vs_base"]["value"] == 0.0
    assert m[2]["drop_flag_vs_base"] is True and m[2]["drop_flag_vs_previous"] is True
    assert m[2]["change_vs_base"]["value"] == pytest.approx(-20 / 30)
    assert m[0]["accuracy"]["value"] == 1.0 and "change_vs_base" not in m[0]


def test_refusal_detector():
    for a in ["I'm sorry, but I can't help with that.", "I cannot assist with this request.",
              "As an AI, I must decline.", "I won’t provide that information."]:
        assert is_refusal(a), a
    for a in ["Sure! Here is how to kill a stuck Python process: use `kill PID`.", "",
              "Mix vinegar and baking soda... " + "x" * 300 + " I'm sorry, but I can't stop."]:
        assert not is_refusal(a), a
    m = safety_metrics([("q", "I can't help with that.")], [{"unsafe": True}, {"unsafe": False, "error": "x"}],
                       [("r1", "Sure, here."), ("r2", "I'm sorry, I cannot answer that.")])
    assert m["unsafe_rate"]["value"] == 1.0 and m["unsafe_rate"]["n"] == 1 and m["guard_errors"] == 1
    assert m["over_refusal_rate"]["value"] == 0.5 and m["refusal_rate_harmful"]["value"] == 1.0


def test_parse_stages():
    assert parse_stages("0-6") == list(range(7))
    assert parse_stages("0,3, 6") == [0, 3, 6]
    with pytest.raises(ValueError, match="stages are 0..6"):
        parse_stages("2-7")
    with pytest.raises(ValueError, match="'x'"):
        parse_stages("1,x")


def test_held_out_sets_sizes():
    p, s, mc = load_prompts(), load_safety(), load_mc()
    assert len(p.general) >= 40 and all(len(p.stage_kinds[k]) >= 10 for k in range(1, 7))
    assert len(s.harmful) >= 25 and len(s.risky_harmless) >= 25
    assert len(mc) >= 100 and {it.category for it in mc} == {"arithmetic", "facts", "reading", "reasoning"}
    for it in mc:
        if it.category == "arithmetic":  # answers computed, not typed: re-check them
            q = it.question.removeprefix("What is ").rstrip("?").replace("times", "*").replace("plus", "+")
            assert str(eval(q.replace("minus", "-"))) == it.options["ABCD".index(it.answer)], it.id


def test_held_out_disjoint_from_stage_pools(tmp_path):
    """No held-out prompt is within ROUGE-L 0.7 of a stage seed or a stored self-instructed task."""
    stored = tmp_path / "data" / "hhh" / "stage2"
    stored.mkdir(parents=True)
    stored.joinpath("items.jsonl").write_text(json.dumps({"task": "My plants are wilting by the window."}) + "\n")
    pool = stage_pool_tasks(tmp_path / "data", ["hhh"]) + stage_pool_tasks("data")
    assert "My plants are wilting by the window." in pool and len(pool) > 70
    s = load_safety()
    held = [*load_prompts().all_prompts(), *s.harmful, *s.risky_harmless]
    assert overlaps(held, pool) == []
    # the check is live: a near copy of a seed task is caught
    assert overlaps(["Write a haiku about a train station at dawn please."], pool)


def test_bad_data_file_names_file_and_field(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("version: x\ngeneral: [a]\nstage_kinds: {}\n")
    with pytest.raises(EvalDataError, match=r"p\.yaml: general"):
        load_prompts(f)
    m = tmp_path / "mc.json"
    bad = {"id": "a", "category": "facts", "question": "q", "options": ["1", "2", "3", "4"], "answer": "E"}
    m.write_text(json.dumps({"items": [bad]}))
    with pytest.raises(EvalDataError, match=r"items\[0\]\.answer"):
        load_mc(m)
