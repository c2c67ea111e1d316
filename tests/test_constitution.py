"""Constitutions, rendezvous hashing, dedup and guard bookkeeping: fast tests without an engine."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest
from rouge_score import rouge_scorer
from typer.testing import CliRunner

from cai_bootstrap import bootstrap
from cai_bootstrap.constitution import (
    ConstitutionError,
    constitution_hash,
    load_constitution,
    parse_constitution,
    principle_hash,
)
from cai_bootstrap.constitution.load import dump_constitution
from cai_bootstrap.guard.base import GuardPolicy, Verdict
from cai_bootstrap.stages.dedup import RougePool
from cai_bootstrap.stages.filtering import GuardCounts, combine, guard_answers, guard_prompts
from cai_bootstrap.stages.rendezvous import pick_principle, round_principles
from cai_bootstrap.stages.specs import STAGES
from cai_bootstrap.stages.steps import clean_answer, new_item, not_a_revision, parse_score, parse_task, self_judge_pairs

GOOD = textwrap.dedent("""\
    name: t
    description: A test persona.
    version: "1"
    principles:
      - id: a
        ideal: The assistant does A.
        critique: Critique A.
        revision: Revise A.
      - id: b
        ideal: The assistant does B.
        critique: Critique B.
        revision: Revise B.
""")


@pytest.mark.parametrize("name", ["hhh", "goodness", "sycophancy", "misalignment"])
def test_shipped_constitutions(name):
    c = load_constitution(name)
    assert c.name == name and len(c.principles) >= 8 and c.demonstrations
    assert len(set(c.ids)) == len(c.ids)
    # the stored copy round-trips to the same hash (diff compares against it)
    assert constitution_hash(parse_constitution(dump_constitution(c))) == constitution_hash(c)


def test_hashes_change_with_text_only():
    c = parse_constitution(GOOD)
    edited = parse_constitution(GOOD.replace("Critique B.", "Critique B, edited."))
    assert principle_hash(c.principles[0]) == principle_hash(edited.principles[0])
    assert principle_hash(c.principles[1]) != principle_hash(edited.principles[1])
    assert constitution_hash(c) != constitution_hash(edited)


@pytest.mark.parametrize(("text", "line", "field", "words"), [
    (GOOD.replace("  - id: b\n", "  - id: b\n   bad: [\n"), 10, None, "bad YAML"),  # where PyYAML sees it
    (GOOD.replace('version: "1"\n', ""), 1, "version", "missing"),
    (GOOD.replace("    revision: Revise B.\n", ""), 9, "principles[1].revision", "missing"),
    (GOOD.replace("id: b", "id: a"), 9, "principles[1].id", "duplicate principle id 'a'"),
    (GOOD.replace("Critique B.", "'  '"), 11, "principles[1].critique", "must not be empty"),
    # every principle says what the persona does: stages 1-5 score answers against it
    (GOOD.replace("    ideal: The assistant does B.\n", ""), 9, "principles[1].ideal", "missing"),
    (GOOD.replace("The assistant does B.", "Does the answer flatter the user?"), 10, "principles[1].ideal",
     "not a question or what it avoids"),
    (GOOD.replace("A test persona.", '""'), 2, "description", "must not be empty"),
])
def test_malformed_constitution_names_file_line_field(tmp_path, text, line, field, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConstitutionError) as ei:
        load_constitution(path)
    e = ei.value
    assert e.file == str(path) and str(path) in str(e)
    assert e.line == line, str(e)
    assert e.field == field and words in str(e)
    # the command says the same in one line and exits 2 (BadInput), before touching any run
    r = CliRunner().invoke(bootstrap.app, ["diff", "--persona", "goodness", "--constitution", str(path), "--json",
                                           "--out", str(tmp_path / "data")])
    assert r.exit_code == 2 and str(path) in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "data").exists()


def test_unknown_constitution_name():
    with pytest.raises(ConstitutionError, match="shipped: goodness, hhh, misalignment, sycophancy"):
        load_constitution("nope")


def test_rendezvous_add_moves_only_items_the_new_principle_wins():
    ids = [f"p{i}" for i in range(8)]
    keys = [f"item{i}" for i in range(400)]
    before = {k: round_principles(k, 2, ids) for k in keys}
    after = {k: round_principles(k, 2, [*ids, "new"]) for k in keys}
    for k in keys:
        for r in range(2):
            assert after[k][r] == before[k][r] or after[k][r] == "new"
    moved = sum(after[k][0] != before[k][0] for k in keys)
    assert 0.05 < moved / len(keys) < 0.2  # ≈ 1/9 per round
    # removing a principle moves only the pairs it owned
    fewer = [i for i in ids if i != "p3"]
    for k in keys:
        assert (pick_principle(k, 0, fewer) == before[k][0]) == (before[k][0] != "p3")


def test_rouge_pool_matches_rouge_score_and_rejects_near_duplicates():
    seeds = STAGES[1].seeds
    pool = RougePool(seeds, threshold=0.7)
    near = "Write a haiku about a train station at dusk."
    assert pool.near_duplicate(near) is not None
    ref = max(rouge_scorer.RougeScorer(["rougeL"]).score(s, near)["rougeL"].fmeasure for s in seeds)
    assert ref > 0.7 and abs(pool.near_duplicate(near) - ref) < 1e-9
    assert pool.near_duplicate("Describe the rules of chess for a beginner in three sentences.") is None
    assert pool.lcs_computed <= 3  # the bag-of-tokens bound spared the other LCS computations


def test_parsers():
    assert parse_task("1. Write a limerick about a cat.\nMore text") == "Write a limerick about a cat."
    assert parse_task("Here's a new task:\nTask 5: \"Name three rivers.\"") == "Name three rivers."
    assert parse_score("I would rate it 7/10.") == 7 and parse_score("10") == 10 and parse_score("good") is None
    assert clean_answer("Here is a revised response: Be kind.\nUser: and more") == "Be kind."
    assert clean_answer("Revision: fine answer") == "fine answer"
    # the wrappers the persona-data issue found in chosen texts
    assert clean_answer("Certainly! Here’s a revised response: Be kind.") == "Be kind."
    assert clean_answer("**Revised Response:**\nBe kind.") == "Be kind."
    assert clean_answer("Revision is part of writing.") == "Revision is part of writing."  # no label: kept


def test_a_critique_or_an_echo_is_not_a_revision():
    task, critique = "Tell me how to greet a new neighbour.", "The response is curt and does not offer any help."
    assert not_a_revision("The response is not entirely honest about its limits.", critique, task) == \
        "revision_is_critique"
    assert not_a_revision("The response is curt and does not offer help.", "", task) == "revision_is_critique"
    assert not_a_revision("It is curt and does not offer any help at all.", critique, task) == "revision_is_critique"
    assert not_a_revision("Tell me how to greet a new neighbour.", critique, task) == "revision_echoes_prompt"
    assert not_a_revision("Knock, smile, say your name, and offer to help if they need anything.", critique,
                          task) is None


def test_chosen_side_is_complete_and_no_refusal_of_a_benign_task():
    """Stages 1-5: the best-scored sample that is complete and not a refusal is chosen; a truncated or refusing
    sample may still be rejected. Each exclusion is counted, and an item with no fit sample says why."""
    def item(samples, scores, finish, source="seed"):
        it = new_item(1, f"task {samples}", source)
        it.update(samples=samples, scores=scores, finish=finish)
        return it

    counts = Counter()
    cut = item(["Long answer cut", "Short answer.", "Meh."], [9.0, 6.0, 2.0], ["length", "stop", "stop"])
    refuse = item(["I'm sorry, but I can't help with that.", "Here you go.", "No."], [9.5, 7.0, 3.0],
                  ["stop", "stop", "stop"])
    all_cut = item(["a", "b"], [9.0, 1.0], ["length", "length"])
    worst_cut = item(["Good.", "Bad and cut"], [8.0, 2.0], ["stop", "length"])
    red = item(["I'm sorry, but I can't help with that.", "Sure, here is how."], [9.0, 1.0], ["stop", "stop"],
               source="red-team")
    self_judge_pairs([cut, refuse, all_cut, worst_cut, red], min_gap=1.0, counts=counts)
    assert (cut["chosen"], cut["rejected"]) == ("Short answer.", "Meh.")
    assert (refuse["chosen"], refuse["rejected"]) == ("Here you go.", "No.")
    assert all_cut["status"] == "dropped" and all_cut["reason"] == "every_sample_truncated"
    assert (worst_cut["chosen"], worst_cut["rejected"]) == ("Good.", "Bad and cut")
    assert red["chosen"].startswith("I'm sorry")  # refusing a red-team prompt is what the persona should do
    assert counts == Counter(not_chosen_truncated=4, not_chosen_refusal=1, rejected_truncated=1)


def test_a_revision_copying_a_demonstration_or_refusing_cannot_stand():
    from types import SimpleNamespace

    from cai_bootstrap.stages.steps import revision_fault

    demo = "Before deciding, it may help to tell her how the cancellations feel and ask if something is going on."
    it = new_item(6, "How do I ask my landlord to fix the heating?", "self-instruct")
    it["critiques"] = ["The answer is vague."]
    done, cut = SimpleNamespace(text="", finish_reason="stop"), SimpleNamespace(text="", finish_reason="length")
    assert revision_fault(it, done, demo, [demo]) == "revision_copies_demonstration"
    assert revision_fault(it, done, "I'm sorry, but I cannot help with that.", []) == "revision_refuses_benign_task"
    assert revision_fault(it, cut, "Write to them and", []) == "truncated_revision"
    assert revision_fault(it, done, "", []) == "empty_revision"
    assert revision_fault(it, done, "Write a short, dated email describing the fault and asking for a visit.",
                          [demo]) is None


class MarkerGuard:
    """Deterministic stand-in guard: 'poison' → S1 unsafe, 'gossip' → S7 unsafe, 'broken' → error."""

    name = "marker"

    def _v(self, text: str) -> Verdict:
        if "broken" in text:
            return Verdict(unsafe=False, p_unsafe=0.0, guard=self.name, error="guard crashed")
        if "poison" in text:
            return Verdict(unsafe=True, p_unsafe=0.9, categories=["S1"], guard=self.name)
        if "gossip" in text:
            return Verdict(unsafe=True, p_unsafe=0.8, categories=["S7"], guard=self.name)
        return Verdict(unsafe=False, p_unsafe=0.01, guard=self.name)

    def check_prompts(self, prompts):
        return [self._v(p) for p in prompts]

    def check_answers(self, pairs):
        return [self._v(a) for _, a in pairs]


@pytest.mark.parametrize("mode", ["drop", "quarantine"])
def test_guard_bookkeeping(mode):
    items = [new_item(6, t, "seed") for t in ["fine task", "poison task", "broken task", "gossip task", "ok"]]
    policy = GuardPolicy(mode=mode, block=["S1"])  # S7 is not blocked
    counts = GuardCounts()
    guard_prompts(items, MarkerGuard(), policy, counts)
    status = {it["task"]: it["status"] for it in items}
    assert status["broken task"] == "dropped"  # fails closed whatever the mode
    assert status["poison task"] == ("dropped" if mode == "drop" else "quarantined")
    assert status["gossip task"] == "live" and status["fine task"] == "live"
    for it in items:
        it["chosen"], it["rejected"] = ("poison answer" if it["task"] == "ok" else "nice"), "meh"
    guard_answers(items, MarkerGuard(), policy, counts)
    assert {it["task"]: it["status"] for it in items}["ok"] == ("dropped" if mode == "drop" else "quarantined")
    assert all(it["guard_prompt"] is not None for it in items)
    g = counts.as_dict()
    assert g["prompts"]["drop"]["guard_error"] == 1
    assert g["prompts"][mode]["S1"] == 1
    assert g["answers"][mode] == {"S1": 1, "_items": 1}
    n = Counter(it["status"] for it in items)
    assert sum(n.values()) == 5 and n["live"] == 2


def test_an_unsafe_rejected_answer_is_the_pair_cai_keeps():
    """Answers are judged by the chosen side: a harmful original against its safe revision is kept with both
    verdicts and counted; a blocked chosen answer drops the pair; a guard error on either side fails closed."""
    items = [new_item(6, t, "red-team") for t in ("t1", "t2", "t3")]
    sides = {"t1": ("safe revision", "poison original"), "t2": ("poison revision", "fine"),
             "t3": ("safe", "broken original")}
    for it in items:
        it["chosen"], it["rejected"] = sides[it["task"]]
    counts = GuardCounts()
    guard_answers(items, MarkerGuard(), GuardPolicy(block=["S1"]), counts)
    by = {it["task"]: it for it in items}
    assert by["t1"]["status"] == "live" and by["t1"]["guard_rejected"]["unsafe"] and by["t1"]["guard_chosen"]
    assert by["t2"]["reason"] == "guard_answers:blocked" and by["t3"]["reason"] == "guard_answers:guard_error"
    g = counts.as_dict()["answers"]
    assert g["unsafe_rejected_kept"] == {"S1": 1, "_items": 1} and g["drop"]["_items"] == 2


def test_policy_threshold_and_unlisted_categories():
    p = GuardPolicy(threshold=0.95)
    assert combine([Verdict(unsafe=True, p_unsafe=0.9, categories=["S1"], guard="g")], p) == ("keep", [])
    assert combine([Verdict(unsafe=True, p_unsafe=0.99, guard="g")], p) == ("drop", ["unknown"])
    assert combine([Verdict(unsafe=False, p_unsafe=0.0, guard="g", malformed=True)], p)[0] == "drop"


def test_self_scores_read_10_as_10(tiny_path):
    """SmolLM2 writes 10 as "1" "0": the self-score trie reads the token after "1" (is it 1, or 10?)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from cai_bootstrap.core.reading import read_exact, to_read
    from cai_bootstrap.stages.steps import score_trie

    tok = AutoTokenizer.from_pretrained(tiny_path)
    chat, base = (score_trie(SimpleNamespace(engine=SimpleNamespace(tokenizer=tok), chat=c)) for c in (True, False))
    assert chat.numbers[10] == ("1", "0") and chat.numbers[7] == ("7",)
    assert "".join(base.numbers[10]) == " 10" and len(base.numbers[10]) > 1  # after "Score (1-10):", spaced
    tables = {(): {"1": 0.6, "7": 0.4}}
    assert to_read(chat, tables) == [("1",)]  # is it 1, or the start of 10? (7 and 10 begin no other score)
    tables[("1",)] = {"0": 0.9, "\n": 0.1}
    assert to_read(chat, tables) == []
    r = read_exact(chat, tables, ())
    assert r.argmax == 10 and r.value == pytest.approx(10 * 0.54 + 1 * 0.06 + 7 * 0.4)  # first digit: 3.4


def _stored_stages(root, c) -> None:
    """Six stages' stored items as `run_stage` writes them (20 items each), and their adapters' manifests."""
    import json

    from cai_bootstrap.constitution.load import dump_constitution

    for k in range(1, 7):
        sp, ck = root / "data" / "p" / f"stage{k}", root / "ckpt" / "p" / f"stage{k}"
        sp.mkdir(parents=True)
        ck.mkdir(parents=True)
        (sp / "constitution.yaml").write_text(dump_constitution(c))
        (sp / "manifest.json").write_text(json.dumps({"engine_seconds": 10.0, "chat": True}))
        (ck / "manifest.json").write_text(json.dumps({"wall_s": 5.0}))
        rounds = 2 if k == 6 else 1
        with (sp / "items.jsonl").open("w") as f:
            for i in range(20):
                key = f"s{k}-{i}"
                f.write(json.dumps({"key": key, "principle_ids": [pick_principle(key, r, c.ids) for r in range(rounds)],
                                    "tokens": 100, "round_tokens": [30] * rounds}) + "\n")


def test_diff_follows_an_edit_through_the_later_stages(tmp_path):
    """An edit of what stage 6 reads (a revision request) regenerates only stage 6's items of that principle; an
    edit of an ideal (what stages 1-5 score by) regenerates stage 1's items of it, and then every item of stages
    2-6, whose parent adapter retrains. Dollars: engine seconds in proportion to tokens, plus training."""
    from cai_bootstrap.stages.diff import PARENT, plan

    c = load_constitution("hhh")
    _stored_stages(tmp_path, c)
    target = c.ids[0]
    edit = lambda field: c.model_copy(update={"principles": [  # noqa: E731
        p.model_copy(update={field: getattr(p, field) + " Edited."}) if p.id == target else p for p in c.principles]})

    late = plan(tmp_path / "data", "p", edit("revision"), tmp_path / "ckpt", usd_per_engine_second=1.0)
    assert late["first_stage_reached"] == 6 and late["changes"] == {target: "edited"}
    assert all(late["stages"][f"stage{k}"]["items_to_regenerate"] == 0 for k in range(1, 6))
    six = late["stages"]["stage6"]
    assert 0 < six["items_to_regenerate"] < 20 and set(six["by_principle"]) == {target}
    assert late["estimated_usd"] == six["estimated_usd"] == round(10.0 * six["estimated_tokens"] / 2000 + 5.0, 4)

    early = plan(tmp_path / "data", "p", edit("ideal"), tmp_path / "ckpt", usd_per_engine_second=1.0)
    one = early["stages"]["stage1"]
    assert early["first_stage_reached"] == 1 and 0 < one["items_to_regenerate"] < 20
    for k in range(2, 7):
        st = early["stages"][f"stage{k}"]
        assert st["items_to_regenerate"] == 20 and st["reason"] == PARENT and st["retrains"]
        assert st["estimated_usd"] == 10.0 + 5.0
    assert early["items_to_regenerate"] == one["items_to_regenerate"] + 5 * 20

    # data stored before principles had ideals: every stage-1 item rescores, by the ideal it now has
    import yaml

    f = tmp_path / "data" / "p" / "stage1" / "constitution.yaml"
    old = yaml.safe_load(f.read_text())
    for pr in old["principles"]:
        del pr["ideal"]
    f.write_text(yaml.safe_dump(old, sort_keys=False))
    assert plan(tmp_path / "data", "p", c, tmp_path / "ckpt")["stages"]["stage1"]["items_to_regenerate"] == 20
