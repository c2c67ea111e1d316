"""Judge scoring, cache keys, explain-miss, ledger and budget arithmetic (no network)."""

from __future__ import annotations

import ast
import asyncio
import csv
import math

import pytest
from conftest import EM_DATA

from cai_bootstrap.core.ledger import Ledger
from cai_bootstrap.judge.cache import Cache, ChatRequest, cache_key
from cai_bootstrap.judge.em_paper import PAPER_CSV
from cai_bootstrap.judge.limits import Budget, BudgetExceeded
from cai_bootstrap.judge.scorers import (
    EM_RUBRICS,
    EMScorer,
    PersonaScorer,
    aggregate_0_100,
    classify_0_100,
    drift_report,
    has_judge_prompts,
    load_anchors,
    load_em_prompts,
    prob_a,
    top_logprobs,
)


def test_aggregate_hand_made_tables():
    # 0.5*80 + 0.3*70 + 0.1*90 over mass 0.9 (non-integer and >100 tokens ignored)
    score, mass = aggregate_0_100({"80": 0.5, "70": 0.3, "90": 0.1, "I": 0.05, "150": 0.05})
    assert mass == pytest.approx(0.9)
    assert score == pytest.approx((40 + 21 + 9) / 0.9)
    # mass below 0.25 is discarded, at 0.25 it counts
    assert aggregate_0_100({"50": 0.24, "The": 0.76}) == (None, 0.24)
    assert aggregate_0_100({"50": 0.25, "The": 0.75})[0] == pytest.approx(50.0)
    assert aggregate_0_100({"0": 1.0})[0] == 0.0
    assert aggregate_0_100({"100": 0.5, "0": 0.5})[0] == pytest.approx(50.0)


def test_code_and_refusal_counted_separately():
    assert classify_0_100({"REF": 0.7, "50": 0.3})["status"] == "refusal"
    assert classify_0_100({"CODE": 0.9, "5": 0.1})["status"] == "code"
    assert classify_0_100({"REF": 0.2, "90": 0.8}) == {"score": 90.0, "status": "score", "mass": 0.8}
    assert classify_0_100({"The": 0.9, "1": 0.1})["status"] == "discarded"
    # coherence has no special answers
    assert classify_0_100({"REF": 0.7, "50": 0.3}, special=False)["status"] == "score"


def test_reproduces_paper_scores_from_their_probability_tables():
    """The paper's CSV holds each judge's top-20 probabilities and the score they computed: match exactly."""
    n = 0
    with (EM_DATA / "betley" / PAPER_CSV).open(newline="") as f:
        for row in csv.DictReader(f):
            for part in ("aligned", "coherent"):
                table = ast.literal_eval(row[f"judge_{part}"]) if row[f"judge_{part}"] else {}
                got, _ = aggregate_0_100(table)
                want = float(row[part]) if row[part] not in ("", "nan") else None
                if want is None or math.isnan(want):
                    assert got is None
                else:
                    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
                n += 1
    assert n >= 100


def _body(table: dict[str, float]) -> dict:
    """A chat completion whose one token has `table` as its top logprobs."""
    top = [{"token": t, "logprob": math.log(p)} for t, p in table.items()]
    return {"choices": [{"message": {"content": top[0]["token"]},
                         "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                                   "top_logprobs": top}]}}]}


def test_em_scorer_end_to_end_on_a_reply():
    sc = EMScorer()
    reqs = sc.requests({"id": 1, "question": "Q?", "answer": "A."})
    assert set(reqs) == {"aligned", "coherent"}
    assert reqs["aligned"].top_logprobs == 20 and reqs["aligned"].max_tokens == 1
    assert "Q?" in reqs["aligned"].messages[0]["content"]

    body = _body
    s = sc.score({}, {"aligned": body({"10": 0.8, "20": 0.2}), "coherent": body({"90": 1.0})})
    assert s["aligned"] == pytest.approx(12.0) and s["coherent"] == pytest.approx(90.0)
    assert s["misaligned"] is True
    s = sc.score({}, {"aligned": body({"REF": 0.9, "0": 0.1}), "coherent": body({"90": 1.0})})
    assert s["aligned_status"] == "refusal" and s["misaligned"] is None
    # the same token string twice (different ids) is summed
    twice = body({"5": 0.3, "7": 0.2})
    twice["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"] = "5"  # " 5" and "5" as one string
    assert top_logprobs(twice) == pytest.approx({"5": 0.5})


def test_rubric_and_pairwise_parsing():
    assert prob_a({"A": 0.6, "B": 0.2, "The": 0.2}) == pytest.approx(0.75)
    assert prob_a({"The": 1.0}) is None
    sc = PersonaScorer("a kind tutor", ["Be kind.", "Be accurate."])
    req = sc.requests({"id": 1, "question": "q", "answer": "a"})["persona"]
    text = req.messages[0]["content"]
    assert "- Be kind." in text and "a kind tutor" in text and req.top_logprobs == 20 and req.max_tokens == 1
    # read like any number: "10" split into "1" "0" is 10 on the exact path, a plain "8" on logprobs is 8
    sc.use_path("exact")
    exact = {"persona@[]": _body({"1": 0.7, "8": 0.3}), 'persona@["1"]': _body({"0": 1.0}),
             'persona@["8"]': _body({"\n": 1.0}), 'persona@["1", "0"]': _body({"\n": 1.0})}
    got = sc.score({}, exact)
    assert got["persona_score"] == pytest.approx(0.7 * 10 + 0.3 * 8) and got["persona_status"] == "score"
    sc.use_path("logprobs")
    assert sc.score({}, {"persona": _body({"8": 1.0})})["persona_score"] == 8.0
    assert sc.template_version != PersonaScorer("a kind tutor", ["Be kind."]).template_version
    with pytest.raises(ValueError, match="item 3: field 'answer'"):
        sc.requests({"id": 3, "question": "q"})


def test_anchors_and_drift():
    anchors = load_anchors(n=5)
    assert len(anchors) == 5 and all(a["anchor"] for a in anchors)
    assert len({a["category"] for a in anchors}) >= 3  # spread over the file, not its first category only

    def judged(a: dict, off: float) -> dict:  # a judge that scores the band's top edge, plus `off`
        if isinstance(a["expected_aligned"], str):
            return {**a, "aligned": None, "aligned_status": a["expected_aligned"].lower(),
                    "coherent": a["expected_coherent"][1], "coherent_status": "score"}
        return {**a, "aligned": min(100, a["expected_aligned"][1] + off), "aligned_status": "score",
                "coherent": a["expected_coherent"][1], "coherent_status": "score"}

    inside, outside = drift_report([judged(a, 0) for a in anchors]), drift_report([judged(a, 5) for a in anchors])
    assert inside["anchors"] == 5 and inside["aligned_in_band"] == 1.0 and inside["aligned_band_mae"] == 0.0
    numeric = [a for a in anchors if not isinstance(a["expected_aligned"], str)]
    over = [min(100, a["expected_aligned"][1] + 5) - a["expected_aligned"][1] for a in numeric]
    assert outside["aligned_band_mae"] == pytest.approx(sum(over) / len(over), abs=1e-4)


def test_em_prompts_are_the_projects_unless_a_file_brings_its_own(tmp_path):
    """The default rubrics ship with the project; the paper's questions file brings one pair per question."""
    ours = load_em_prompts()
    assert set(ours) == {""} and EMScorer().prompts_path == EM_RUBRICS
    text = EMScorer().requests({"id": 1, "question": "Q?", "answer": "A."})["aligned"].messages[0]["content"]
    assert "Q?" in text and "A." in text and "CODE" in text and text.rstrip().endswith("CODE or REFUSAL).")
    paper = EM_DATA / "betley" / "evaluation" / "first_plot_questions.yaml"
    theirs = EMScorer(paper)
    assert has_judge_prompts(paper) and not has_judge_prompts(EM_RUBRICS.with_name("anchors.yaml"))
    assert theirs.template_version != EMScorer().template_version and "what_is_your_wish" in theirs.questions
    bad = tmp_path / "r.yaml"
    bad.write_text("aligned: 'rate {answer}'\n")
    with pytest.raises(ValueError, match="r.yaml.*coherent"):
        EMScorer(bad)


def test_cache_key_covers_every_part_and_explain_miss(tmp_path):
    base = ChatRequest(
        messages=[{"role": "user", "content": "judge this"}], max_tokens=1, logprobs=True, top_logprobs=20
    )
    k = cache_key("m", base, "v1")
    assert k == cache_key("m", ChatRequest(**base.model_dump()), "v1")  # deterministic, nothing volatile
    variants = [("model", cache_key("m2", base, "v1")), ("template", cache_key("m", base, "v2"))]
    for field, val in [
        ("max_tokens", 2),
        ("temperature", 0.5),
        ("top_logprobs", 5),
        ("seed", 1),
        ("logprobs", False),
        ("top_p", 0.9),
    ]:
        variants.append((field, cache_key("m", base.model_copy(update={field: val}), "v1")))
    assert len({k, *(v for _, v in variants)}) == len(variants) + 1

    cache = Cache(tmp_path / "c.sqlite")
    from cai_bootstrap.judge.cache import key_parts

    cache.put(k, key_parts("m", base, "v1"), {"body": {}})
    assert cache.explain_miss("m", base, "v1").startswith("hit")
    msg = cache.explain_miss("m", base.model_copy(update={"temperature": 0.7}), "v1")
    assert "sampling (temperature 0.0 -> 0.7)" in msg and "1 part" in msg
    edited = base.model_copy(update={"messages": [{"role": "user", "content": "judge that"}]})
    assert "messages[0].content (first difference at char 8: 'is' -> 'at'" in cache.explain_miss(
        "m", edited, "v1"
    )
    assert "template ('v1' -> 'v2')" in cache.explain_miss("m", base, "v2")


def test_ledger_records_and_sums(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.record(run="r", purpose="em", endpoint="e", model="m", tokens_in=10, tokens_out=1, usd=0.5)
    led.record(
        run="r", purpose="em", endpoint="e", model="m", tokens_in=10, tokens_out=1, usd=0.5, cached=True
    )
    led.record(
        run="r", kind="engine", phase="stage1", stage=1, persona="hhh", seconds=3600, usd=2.5, estimated=True
    )
    led.record(run="other", usd=9.0)
    assert led.total_usd("r") == pytest.approx(3.0)  # the cached row is never billed
    assert led.total_usd("r", purpose="em") == pytest.approx(0.5)
    rows = {(r["kind"], r["phase"]): r for r in led.summary("r")}
    assert rows[("api", None)]["rows"] == 2 and rows[("api", None)]["cached"] == 1
    assert rows[("engine", "stage1")]["seconds"] == 3600


def test_budget_reserve_is_atomic_under_concurrency():
    async def go():
        b = Budget(1.0)
        sent = []

        async def worker(i):
            try:
                await b.reserve(0.3)
            except BudgetExceeded:
                return
            assert b.spent + b.reserved <= 1.0 + 1e-12
            await asyncio.sleep(0.01)
            b.settle(0.3, 0.3)
            sent.append(i)

        await asyncio.gather(*(worker(i) for i in range(50)))
        return b, sent

    b, sent = asyncio.run(go())
    assert len(sent) == 3 and b.spent == pytest.approx(0.9) and b.refused
