"""The three ways a judge's number is read (core.reading): exact on synthetic trie tables, sampled against a
local server that answers like a reasoning model (its 400s, its text replies), and the switch between them."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fault_server import FaultServer  # noqa: E402

from cai_bootstrap.core.reading import Trie, parse_reply, prefix_prob, read_exact, read_sampled, to_read  # noqa: E402
from cai_bootstrap.judge.config import JudgeConfig  # noqa: E402
from cai_bootstrap.judge.farm import run_judge  # noqa: E402
from cai_bootstrap.judge.scorers import EMScorer  # noqa: E402


def _table(**probs: float) -> dict[str, float]:
    return {k.removeprefix("t"): v for k, v in probs.items()}


def test_exact_reads_two_digit_numbers_with_their_stop():
    """P(85) = P(8) P(5|8); a lone "8" that stops is 8, never 80-89 folded into 8 (its stop is read)."""
    trie = Trie()
    tables = {(): _table(t8=0.7, t9=0.1, tI=0.2)}
    first = to_read(trie, tables)
    assert ("8",) in first and ("9",) in first and ("1",) not in first  # "1" has no mass: not expanded
    tables[("8",)] = _table(t5=0.9)  # stop after "8": 0.1
    tables[("9",)] = _table(t0=1.0)
    # 85 and 90 begin no other number 0-100: leaves, taken as complete without reading what follows
    assert to_read(trie, tables) == [] and ("8", "5") in trie.leaves and ("1", "0") not in trie.leaves
    r = read_exact(trie, tables)
    p85, p8, p90 = 0.7 * 0.9, 0.7 * 0.1, 0.1
    assert r.status == "score" and r.argmax == 85
    assert r.mass == pytest.approx(p85 + p8 + p90, abs=1e-6)
    assert r.value == pytest.approx((85 * p85 + 8 * p8 + 90 * p90) / (p85 + p8 + p90))
    assert prefix_prob(("8", "5"), tables) == pytest.approx(p85)


def test_exact_discards_without_mass_and_reports_labels():
    trie = Trie()
    r = read_exact(trie, {(): {"The": 0.9, "5": 0.1}, ("5",): {".": 1.0}})
    assert r.status == "discarded" and r.mass == pytest.approx(0.1)
    r = read_exact(trie, {(): {"REF": 0.8, "5": 0.2}, ("5",): {".": 1.0}}, labels=("REFUSAL",))
    assert r.status == "refusal" and r.value is None


def test_sampled_parses_the_last_integer_and_counts_what_does_not_parse():
    assert parse_reply("Reasoning about it... I'd say 72.\nScore: 85") == 85
    assert parse_reply("No figure.") is None and parse_reply("REFUSAL") == "REFUSAL"
    assert parse_reply("I rate it 3.5") is None  # not an integer answer
    assert parse_reply("I'd give it 85/100.") == 85 and parse_reply("7 out of 10", hi=10) == 7  # not the scale
    assert parse_reply("Score: 85.") == 85  # a full stop ends the number
    assert parse_reply("I'd say 8/10") is None  # another scale than the rubric's 0-100: not read as 8
    body = lambda t: {"choices": [{"message": {"content": t}}]}  # noqa: E731
    r = read_sampled([body("80"), body("90"), body("hmm")])
    assert (r.value, r.status, r.replies, r.parsed) == (85.0, "score", 3, 2)
    assert read_sampled([body("hmm")]).status == "unparsed"


@pytest.fixture(scope="module")
def reasoning():
    with FaultServer() as s:
        s.reset(reasoning=True, p_unparsable=0.2)
        yield s


def _cfg(url: str, **kw) -> JudgeConfig:
    retry = {"request_timeout_s": 2, "backoff_base_s": 0.02, "backoff_cap_s": 0.1, "deadline_s": 30}
    return JudgeConfig(model="gpt-5-mini", endpoints=[{"name": "reasoning", "base_url": url, "rpm": 6000,
                                                       "max_concurrent": 8, "usd_per_m_in": 0.25,
                                                       "usd_per_m_out": 2.0}], retry=retry, **kw)


def test_a_reasoning_model_is_switched_to_sampling_once_and_every_item_is_judged(reasoning):
    items = [{"id": i, "question": f"q{i}?", "answer": f"answer {i}"} for i in range(12)]
    res, s = run_judge(items, EMScorer(), _cfg(reasoning.url, samples=4), progress=False)
    assert s.ok == 12 and s.path == "sampled"
    assert len(s.path_switches) == 1 and "logprobs are not supported" in s.path_switches[0]
    assert reasoning.stats()["status"][400] >= 1
    for r in res:
        assert r.scores["judge_path"] == "sampled" and r.scores["aligned_replies"] == 4
        parsed = r.scores["aligned_parsed"]
        assert r.scores["aligned_status"] == ("score" if parsed else "unparsed")
        if parsed:
            assert 0 <= r.scores["aligned"] <= 100
    # 20% of replies carry no number: they are counted, not dropped
    unparsed = sum(4 - r.scores["aligned_parsed"] + 4 - r.scores["coherent_parsed"] for r in res)
    assert 0 < unparsed < 0.5 * 12 * 8
    assert all(r.tokens_out >= 8 * 48 for r in res)  # reasoning tokens are billed as output


def test_the_sampled_path_sends_what_reasoning_models_take(reasoning):
    """Configured as sampled from the start: no 400 at all; the requests carry max_completion_tokens only."""
    items = [{"id": i, "question": f"s{i}?", "answer": "fine"} for i in range(3)]
    before = reasoning.stats()["status"][400]
    res, s = run_judge(items, EMScorer(), _cfg(reasoning.url, scoring="sampled", samples=2), progress=False)
    assert s.ok == 3 and s.path_switches == [] and reasoning.stats()["status"][400] == before
    assert s.requests_sent == 3 * 2 * 2


def test_pairwise_and_persona_judges_switch_to_sampling_too(reasoning):
    """The per-stage evaluation's judges on a reasoning model: A/B and 1-10 read from sampled replies."""
    from cai_bootstrap.judge.scorers import PairwiseScorer, PersonaScorer

    pairs = [{"id": i, "question": f"p{i}?", "answer_a": f"kind {i}", "answer_b": f"rude {i}"} for i in range(6)]
    res, s = run_judge(pairs, PairwiseScorer("a kind tutor", ["Be kind."]), _cfg(reasoning.url, samples=3),
                       progress=False)
    assert s.ok == 6 and s.path == "sampled" and len(s.path_switches) == 1
    for r in res:
        got = r.scores
        assert got["judge_path"] == "sampled" and 0 <= got["unparsed"] <= 6
        # each order's P(A) is a share of the parsed replies, None only when none named a letter
        assert got["p_a_better"] is None or 0 <= got["p_a_better"] <= 1
    assert sum(r.scores["p_a_better"] is not None for r in res) >= 5
    assert sum(r.scores["unparsed"] for r in res) > 0  # 20% of replies name no letter: counted
    items = [{"id": i, "question": f"r{i}?", "answer": f"answer {i}"} for i in range(4)]
    res, s = run_judge(items, PersonaScorer("a kind tutor", ["Be kind."]), _cfg(reasoning.url, samples=2),
                       progress=False)
    assert s.ok == 4 and all(r.scores["judge_path"] == "sampled" for r in res)
    assert all(r.scores["persona_status"] == "unparsed" or 1 <= r.scores["persona_score"] <= 10 for r in res)
    assert sum(r.scores["persona_status"] == "score" for r in res) >= 3


def test_any_other_400_fails_the_item_and_keeps_the_path(reasoning):
    reasoning.reset(reasoning=False)
    try:
        items = [{"id": 0, "question": "ALWAYS400", "answer": "x"}, {"id": 1, "question": "TOOLONG400", "answer": "x"}]
        res, s = run_judge(items, EMScorer(), _cfg(reasoning.url), progress=False)
    finally:
        reasoning.reset(reasoning=True)
    assert [r.status for r in res] == ["failed", "failed"] and all("http 400" in r.reason for r in res)
    assert s.path == "logprobs" and s.path_switches == []  # "max_tokens is too large" is no reasoning model


def test_number_probabilities_sum_like_a_distribution():
    trie = Trie(lo=1, hi=10)  # a 1-10 self-score: "10" is two tokens for a digit-splitting tokenizer
    tables = {(): {"1": 0.5, "7": 0.5}, ("1",): {"0": 0.8, ".": 0.2}, ("7",): {"\n": 1.0}, ("1", "0"): {"\n": 1.0}}
    r = read_exact(trie, tables)
    assert r.mass == pytest.approx(1.0) and r.argmax == 7 and r.value == pytest.approx(0.4 * 10 + 0.1 * 1 + 0.5 * 7)
    assert math.isclose(r.pruned_mass, 0.0)
