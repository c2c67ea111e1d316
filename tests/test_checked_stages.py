"""Stages 1 and 4, where code checks the samples: IFEval constraints (lm-eval's registry) and constructed
comparisons with a known answer; their pairs and the per-stage goal figure. No engine."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from cai_bootstrap.stages import known_answers, verifiable
from cai_bootstrap.stages.goal import describe, goal_figure
from cai_bootstrap.stages.specs import STAGES
from cai_bootstrap.stages.steps import constrained, known_answer_items, new_item, self_judge_pairs


def test_constraints_are_drawn_from_the_task_and_checked_by_ifeval():
    ids = verifiable.constraint_ids()
    assert "punctuation:no_comma" in ids and not set(verifiable.LEFT_OUT) & set(ids)
    draws = [verifiable.draw(f"key{i}", 64) for i in range(200)]
    assert draws[7] == verifiable.draw("key7", 64)  # the same task always gets the same constraints
    assert Counter(len(d) for d in draws).keys() == {1, 2}
    assert len({c["id"] for d in draws for c in d}) == len(ids)  # every usable constraint comes up
    # word limits fit the token cap (IFEval's own range, 100-500 words, cannot be met in 64 tokens)
    words = [c["kwargs"]["num_words"] for d in draws for c in d if c["id"] == "length_constraints:number_words"]
    assert words and max(words) <= 64 * verifiable.WORDS_PER_TOKEN / 2
    no_comma = [{"id": "punctuation:no_comma", "kwargs": {}, "text": "Do not use commas."}]
    end = [{"id": "startend:end_checker", "kwargs": {"end_phrase": "Any other questions?"}, "text": "..."}]
    assert verifiable.follows(no_comma, "Plain words only.") == [True]
    assert verifiable.follows(no_comma, "One, two.") == [False]
    assert verifiable.follows(no_comma, "") == [False]  # an empty answer follows nothing
    assert verifiable.follows(no_comma + end, "Done here. Any other questions?") == [True, True]
    assert verifiable.follows(no_comma + end, "Done, here. Any other questions? Bye") == [False, False]


def test_a_constrained_item_carries_its_constraints_in_the_task():
    it = constrained(new_item(1, "Write a haiku about rain.", "seed"), 96)
    cons = it["check"]["constraints"]
    assert it["task"].startswith("Write a haiku about rain. ") and all(c["text"] in it["task"] for c in cons)
    assert it["key"] != new_item(1, "Write a haiku about rain.", "seed")["key"] and it["source"] == "seed"


@pytest.mark.parametrize("fam", sorted(known_answers.FAMILIES))
def test_known_answer_tasks_mark_the_unflawed_answer(fam):
    """The answer key is right by construction: for the computed families, re-derive it from the task text."""
    tasks = [t for t in known_answers.make_tasks(140, seed=3) if t["family"] == fam]
    assert len(tasks) >= 10
    assert Counter(t["answer"] for t in tasks).keys() == {"A", "B"}  # the correct one is not always first
    for t in tasks:
        ans = dict(re.findall(r"Answer ([AB]): (.*)", t["task"]))
        right, wrong = ans[t["answer"]], ans["B" if t["answer"] == "A" else "A"]
        assert right != wrong
        if fam == "percent":
            p, n = map(int, re.match(r"What is (\d+)% of (\d+)", t["task"]).groups())
            assert right.startswith(f"{p}% of {n} is {p * n // 100},")
        elif fam == "sort":
            assert right.rstrip(".").split(", ") == sorted(right.rstrip(".").split(", "))
            assert wrong.rstrip(".").split(", ") != sorted(wrong.rstrip(".").split(", "))
        elif fam == "letters":
            c, w = re.search(r"letter '(.)' appear in the word '(\w+)'", t["task"]).groups()
            assert f"appears {w.count(c)} time" in right
        elif fam == "capital":
            country = re.search(r"capital of (.+)\?", t["task"]).group(1)
            assert right == f"The capital of {country} is {known_answers.CAPITALS[country]}."
    assert known_answers.make_tasks(30, seed=1) == known_answers.make_tasks(30, seed=1)


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("**A** because", "A"), ("Answer B: it is", "B"), ("(A) is right", "A"), ("A is correct.", "A"),
    ("B. The other one", "B"), ("A good answer would be B", None), ("The answer is B", None), ("Both", None),
    ("Answer: B", "B"), ("**Answer: A**", "A"), ("A because 12 is right", "A"), ("A\n\nthe first one", "A"),
])
def test_the_verdict_is_the_letter_the_reply_begins_with(reply, letter):
    assert known_answers.verdict(reply) == letter


def _item(stage, samples, scores, passed, finish=None):
    it = new_item(stage, f"task {samples}", "seed", check={"kind": "known-answer", "answer": "A"})
    it.update(samples=samples, scores=scores, finish=finish or ["stop"] * len(samples),
              passed=passed, followed=[[p] for p in passed])
    return it


def test_checked_pairs_put_a_passing_sample_against_a_failing_one():
    """Where code checks the samples, the best-scored passing sample that may be chosen stands against the
    worst-scored failing one, whatever their score gap; items the check cannot split are dropped by reason."""
    counts = Counter()
    mixed = _item(4, ["A. yes", "B. no", "A, sure", "B!"], [3.0, 9.0, 5.0, 8.5], [True, False, True, False])
    all_fail = _item(4, ["B", "B."], [5.0, 6.0], [False, False])
    all_pass = _item(4, ["A", "A."], [5.0, 6.0], [True, True])
    cut = _item(4, ["A and then", "B"], [9.0, 2.0], [True, False], finish=["length", "stop"])
    unscored = _item(4, ["A.", "B?", "B!"], [4.0, None, 6.0], [True, False, False])  # the check still decides
    self_judge_pairs([mixed, all_fail, all_pass, cut, unscored], min_gap=1.0, counts=counts)
    assert (unscored["chosen"], unscored["rejected"]) == ("A.", "B?")  # an unparsable score ranks lowest
    assert (mixed["chosen"], mixed["rejected"]) == ("A, sure", "B!")  # the score favoured a failing sample
    assert [it["reason"] for it in (all_fail, all_pass, cut)] == [
        "no_sample_passes_check", "every_sample_passes_check", "no_passing_sample_fit_to_choose"]
    assert counts == Counter(not_chosen_truncated=1, rejected_truncated=0)

    goal = goal_figure(STAGES[4], [mixed, all_fail, all_pass, cut])  # (without `unscored`)
    assert (goal["samples"]["k"], goal["samples"]["n"]) == (5, 10)
    assert goal["chosen"]["value"] == 1.0 and goal["rejected"]["value"] == 0.0 and goal["chosen"]["n"] == 1
    assert 0 < goal["samples"]["lo"] < 0.5 < goal["samples"]["hi"] < 1  # a Wilson interval with every rate
    assert describe(goal) == ("answers that name the correct answer: samples 50% (5/10), chosen 100% (1/1), "
                              "rejected 0% (0/1)")


def test_stage_one_goal_counts_single_constraints_and_other_stages_their_scores():
    it = _item(1, ["x", "y", "z"], [7.0, 2.0, 4.0], [True, False, False])
    it["followed"] = [[True, True], [True, False], [False, False]]
    self_judge_pairs([it])
    goal = goal_figure(STAGES[1], [it])
    assert goal["constraints_followed"]["rejected"]["k"] == 1 and goal["constraints_followed"]["chosen"]["k"] == 2
    assert goal["constraints_followed"]["samples"]["k"] == 3 and goal["rejected"]["k"] == 0

    plain = new_item(2, "task", "seed")
    plain.update(samples=["a", "b", "c"], scores=[8.0, 2.0, 5.0], finish=["stop"] * 3)
    self_judge_pairs([plain])
    assert goal_figure(STAGES[2], [plain]) == {"metric": "self-score of the persona's ideal (1-10)", "pairs": 1,
                                                "chosen_mean": 8.0, "rejected_mean": 2.0}


def test_stage_four_items_are_constructed_with_their_key():
    items = known_answer_items(4, 9, seed=0)
    assert len(items) == 9 and len({it["key"] for it in items}) == 9
    assert all(it["source"] == "known-answer" and it["check"]["answer"] in "AB" for it in items)
