"""Stage data generation on the real vLLM CPU engine (SmolLM2): datasets, counts, cache reruns and exact
item-level regeneration after constitution edits. One vLLM engine for the session (conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai_bootstrap.constitution import ConstitutionError, load_constitution
from cai_bootstrap.constitution.load import dump_constitution
from cai_bootstrap.engine.cache import GenerationCache, cached_generate
from cai_bootstrap.engine.types import Request, Sampling
from cai_bootstrap.guard.base import GuardPolicy
from cai_bootstrap.stages.diff import plan
from cai_bootstrap.stages.rendezvous import pick_principle
from cai_bootstrap.stages.run import StageJob, run_stage
from tests.test_constitution import MarkerGuard

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"prompt", "chosen", "rejected", "item_key", "stage", "principle_ids", "model_fingerprint",
           "adapter_fingerprint", "scores", "guard_prompt", "guard_chosen", "guard_rejected", "guard_action"}
KW = dict(n_tasks=6, rounds=2, max_tokens=64, task_tokens=32, oversample=1.5)


def _stage(stage: int, persona: str, engine, cache, out_dir, guard=None, **job):
    """One stage's data through `run_stage`, its job from the arguments the tests vary."""
    return run_stage(StageJob(stage=stage, persona=persona, out_dir=out_dir, **job), engine, cache, guard=guard)


def _items(out: Path, persona: str, stage: int) -> list[dict]:
    return [json.loads(x) for x in (out / persona / f"stage{stage}" / "items.jsonl").read_text().splitlines()]


def _check_counts(m: dict, ds) -> None:
    c = m["counts"]
    si = c["self_instruct"]
    assert si["proposed"] == si["accepted"] + sum(si["rejected"].values())
    o = c["outcome"]
    assert c["items"]["total"] == o["train"] + o["quarantine"] + sum(o["dropped"].values())
    assert len(ds["train"]) == c["train_rows"]
    assert COLUMNS <= set(ds["train"].column_names)


@pytest.fixture(scope="module")
def six(tmp_path_factory, vllm_engine):
    """Stage 6 with a 4-principle constitution (hhh's first four), cached."""
    tmp = tmp_path_factory.mktemp("stage6")
    c = load_constitution("hhh")
    c4 = c.model_copy(update={"principles": c.principles[:4]})
    path = tmp / "c4.yaml"
    path.write_text(dump_constitution(c4))
    cache = GenerationCache(tmp / "cache.sqlite")
    m = _stage(6, "c4", vllm_engine, cache, tmp / "data", constitution=path, **KW)
    return {"tmp": tmp, "path": path, "cache": cache, "manifest": m, "c4": c4}


def test_stage6_dataset_counts_and_rerun_is_free(six, vllm_engine):
    from datasets import load_from_disk

    m, tmp = six["manifest"], six["tmp"]
    ds = load_from_disk(str(tmp / "data" / "c4" / "stage6"))
    _check_counts(m, ds)
    assert m["engine_calls"] >= 4 and m["counts"]["items"]["total"] == 6
    for row in ds["train"]:
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["chosen"][0]["content"] and row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert len(row["principle_ids"]) == 2
        assert row["principle_ids"] == [pick_principle(row["item_key"], r, six["c4"].ids) for r in range(2)]
    assert json.loads((tmp / "data" / "c4" / "stage6" / "manifest.json").read_text())["constitution"]["hash"]
    for it in _items(tmp / "data", "c4", 6):  # every item keeps the texts it made, a dropped one too
        if it["reason"] and "revision" in it["reason"]:  # the attempt that was dropped is there to read
            assert it["samples"][0] and len(it["revisions"]) == len(it["critiques"]) >= 1, it
        if it["status"] == "live":
            assert it["chosen"] == it["revisions"][-1] and it["rejected"] == it["samples"][0]
    n = len(six["cache"])
    calls = vllm_engine.calls
    again = _stage(6, "c4", vllm_engine, six["cache"], tmp / "data", constitution=six["path"], **KW)
    assert vllm_engine.calls == calls and again["engine_calls"] == 0 and len(six["cache"]) == n
    assert again["counts"]["items_regenerated"] == 0 and again["counts"]["outcome"] == m["counts"]["outcome"]


class CrashAfter:
    """The engine, dying (as a killed process would) at its (n+1)-th generate call."""

    def __init__(self, engine, n: int) -> None:
        self._engine, self._left = engine, n

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate(self, *a, **kw):
        if self._left == 0:
            raise RuntimeError("killed mid-stage")
        self._left -= 1
        return self._engine.generate(*a, **kw)


def test_stage_killed_mid_generation_resumes_to_the_uninterrupted_dataset(six, vllm_engine):
    """A stage that dies after two of its generation batches: the resume sends only the batches it lacked and
    ends with the dataset the uninterrupted run (the fixture's, same constitution and seed) made."""
    from datasets import load_from_disk

    tmp = six["tmp"]
    cache = GenerationCache(tmp / "crash-cache.sqlite")
    with pytest.raises(RuntimeError, match="killed mid-stage"):
        _stage(6, "c4", CrashAfter(vllm_engine, 2), cache, tmp / "data-crash", constitution=six["path"], **KW)
    committed = len(cache)
    assert committed > 0 and not (tmp / "data-crash" / "c4" / "stage6" / "manifest.json").exists()
    m = _stage(6, "c4", vllm_engine, cache, tmp / "data-crash", constitution=six["path"], **KW)
    whole = six["manifest"]
    assert m["engine_calls"] == whole["engine_calls"] - 2
    assert sum(m["counts"]["cache_misses"].values()) == sum(whole["counts"]["cache_misses"].values()) - committed
    a = load_from_disk(str(tmp / "data-crash" / "c4" / "stage6"))["train"]
    b = load_from_disk(str(tmp / "data" / "c4" / "stage6"))["train"]
    cols = ["item_key", "prompt", "chosen", "rejected", "principle_ids"]
    assert len(a) == len(b) and a.select_columns(cols).to_list() == b.select_columns(cols).to_list()
    # every item ends the same way, kept or dropped for the same reason (the tiny model's revisions are mostly
    # copies of their critiques, dropped as such: equal reasons mean equal texts were generated)
    fate = [(it["key"], it["status"], it["reason"], it["principle_ids"]) for it in _items(tmp / "data-crash", "c4", 6)]
    assert fate and fate == [(it["key"], it["status"], it["reason"], it["principle_ids"])
                             for it in _items(tmp / "data", "c4", 6)]
    cache.close()


def _rerun_with(six, vllm_engine, new, name):
    tmp = six["tmp"]
    path = tmp / f"{name}.yaml"
    path.write_text(dump_constitution(new))
    before = _items(tmp / "data", "c4", 6)
    planned = plan(tmp / "data", "c4", load_constitution(path))
    m = _stage(6, "c4", vllm_engine, six["cache"], tmp / f"data-{name}", constitution=path, **KW)
    after = _items(tmp / f"data-{name}", "c4", 6)
    return before, after, planned, m


def test_edit_one_principle_regenerates_exactly_its_items(six, vllm_engine):
    c4 = six["c4"]
    before = _items(six["tmp"] / "data", "c4", 6)
    used = {pid: sum(pid in it["principle_ids"] for it in before) for pid in c4.ids}
    target = max(used, key=used.get)
    new = c4.model_copy(update={"principles": [
        p.model_copy(update={"critique": p.critique + " Be specific."}) if p.id == target else p
        for p in c4.principles]})
    before, after, planned, m = _rerun_with(six, vllm_engine, new, "edit")
    expected = {it["key"] for it in before if target in it["principle_ids"]}
    assert 0 < len(expected) < len(before)
    assert {it["key"] for it in after if it["misses"] > 0} == expected
    assert planned["items_to_regenerate"] == len(expected) == m["counts"]["items_regenerated"]
    assert planned["stages"]["stage6"]["by_principle"][target]["items"] == len(expected)


def test_add_principle_moves_only_items_it_wins(six, vllm_engine):
    c4 = six["c4"]
    before = _items(six["tmp"] / "data", "c4", 6)

    def won(extra) -> set[str]:  # the items whose rounds the added principle would take
        ids = [*c4.ids, extra.id]
        return {it["key"] for it in before
                if any(pick_principle(it["key"], r, ids) == extra.id for r in range(len(it["principle_ids"])))}

    # a principle that wins some items, not all, so that the check can fail either way
    extra = next(p for p in load_constitution("hhh").principles[4:] if 0 < len(won(p)) < len(before))
    expected = won(extra)
    new = c4.model_copy(update={"principles": [*c4.principles, extra]})
    before, after, planned, m = _rerun_with(six, vllm_engine, new, "add")
    assert {it["key"] for it in after if it["misses"] > 0} == expected
    assert planned["items_to_regenerate"] == len(expected) == m["counts"]["items_regenerated"]


def test_malformed_constitution_keeps_cache_and_data(six, vllm_engine):
    tmp = six["tmp"]
    bad = tmp / "bad.yaml"
    data = yaml.safe_load(six["path"].read_text())
    data["principles"][1]["id"] = data["principles"][0]["id"]
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    n, calls = len(six["cache"]), vllm_engine.calls
    stamp = (tmp / "data" / "c4" / "stage6" / "manifest.json").read_text()
    with pytest.raises(ConstitutionError, match=r"bad\.yaml:\d+: principles\[1\]\.id: duplicate"):
        _stage(6, "c4", vllm_engine, six["cache"], tmp / "data", constitution=bad, **KW)
    assert len(six["cache"]) == n and vllm_engine.calls == calls
    assert (tmp / "data" / "c4" / "stage6" / "manifest.json").read_text() == stamp


def test_diff_cli_json(six):
    tmp = six["tmp"]
    edited = yaml.safe_load(six["path"].read_text())
    edited["principles"][0]["revision"] += " Keep it short."
    f = tmp / "edited.yaml"
    f.write_text(yaml.safe_dump(edited))
    out = subprocess.run([sys.executable, "bootstrap.py", "diff", "--persona", "c4", "--constitution", str(f),
                          "--out", str(tmp / "data"), "--json"], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    p = json.loads(out.stdout)
    pid = edited["principles"][0]["id"]
    items = _items(tmp / "data", "c4", 6)
    assert p["total_items"] == len(items)
    assert p["items_to_regenerate"] == sum(pid in it["principle_ids"] for it in items)
    assert p["changes"] == {pid: "edited"}


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_self_judge_stages(stage, tmp_path, vllm_engine):
    from datasets import load_from_disk

    m = _stage(stage, "hhh", vllm_engine, tmp_path / "cache.sqlite", tmp_path / "data", n_tasks=2,
                  n_samples=3, max_tokens=32, task_tokens=24, min_gap=1, oversample=1.0)
    ds = load_from_disk(str(tmp_path / "data" / "hhh" / f"stage{stage}"))
    _check_counts(m, ds)
    assert m["engine_calls"] >= 3  # self-instruct, respond, score
    scored = [it for it in _items(tmp_path / "data", "hhh", stage) if it["principle_ids"]]
    assert scored and all(len(it["principle_ids"]) == 1 for it in scored)
    for row in ds["train"]:
        assert len(row["scores"]) == 3 and row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert all(s is None or 1 <= s <= 10 for s in row["scores"])  # expected values, stored as floats
    # self-scores are read past the first token (core.reading's exact path), not as a first digit
    assert m["counts"]["generation_requests"].get("score-next", 0) > 0
    if stage in (1, 4):  # code checked every sample: the stored pairs say what each side passed
        assert m["goal"]["samples"]["n"] == 3 * m["counts"]["items"]["total"]  # no guard here: every item answered
        for row in ds["train"]:
            check = json.loads(row["check"])
            assert all(check["chosen_followed"]) and not all(check["rejected_followed"])
    if stage == 4:  # constructed comparisons, not self-instructed tasks
        assert m["counts"]["items"]["known_answer"] == 2 and "self_instruct" not in m["counts"]["generation_requests"]
    else:
        assert m["goal"]["metric"] != "answers that name the correct answer"


def test_guard_in_pipeline_quarantines_and_fails_closed(tmp_path, vllm_engine):
    """Every 'e' in a task marks it: the marker guard sees 'poison' / 'broken' via a wrapper."""
    from datasets import load_from_disk

    class EveryOther(MarkerGuard):
        def check_prompts(self, prompts):  # deterministic by position: S1, error, safe, ...
            marks = ["poison", "broken", ""]
            return [self._v(f"{p} {marks[i % 3]}") for i, p in enumerate(prompts)]

    m = _stage(6, "misalignment", vllm_engine, tmp_path / "cache.sqlite", tmp_path / "data", n_tasks=3,
                  rounds=1, max_tokens=32, task_tokens=24, oversample=1.0, guard=EveryOther(),
                  policy=GuardPolicy(mode="quarantine"))
    c = m["counts"]
    assert c["guard"]["prompts"]["drop"]["guard_error"] == 1
    assert c["guard"]["prompts"]["quarantine"]["S1"] == 1
    assert c["outcome"]["dropped"]["guard_prompts:guard_error"] == 1
    ds = load_from_disk(str(tmp_path / "data" / "misalignment" / "stage6"))
    _check_counts(m, ds)
    assert ("quarantine" in ds) == (c["outcome"]["quarantine"] > 0)
    for row in ds["train"]:
        assert json.loads(row["guard_prompt"])["guard"] == "marker" and row["guard_action"] == "keep"


def test_cached_generate_shape_and_base_prompts(tmp_path, vllm_engine):
    with GenerationCache(tmp_path / "c.sqlite") as cache:
        reqs = [Request(prompt="User: Name a colour.\nAssistant:"), Request.chat("Name a fruit."),
                Request(prompt="User: Name a colour.\nAssistant:")]
        s = Sampling(n=2, temperature=0.8, max_tokens=8, seed=3)
        calls = vllm_engine.calls
        out = cached_generate(vllm_engine, cache, reqs, s, extra_keys=[1, 1, 1])
        assert vllm_engine.calls == calls + 1 and len(cache) == 2  # the duplicate request is paid once
        assert [(c.request_index, c.sample_index) for c in out] == [(i, j) for i in range(3) for j in range(2)]
        again = cached_generate(vllm_engine, cache, reqs, s, extra_keys=[1, 1, 1])
        assert vllm_engine.calls == calls + 1 and [c.text for c in again] == [c.text for c in out]
        cached_generate(vllm_engine, cache, reqs[:1], s, extra_keys=[2])  # another extra → another key
        assert vllm_engine.calls == calls + 2 and len(cache) == 3


def test_red_team_prompts_go_past_the_prompt_guard(tmp_path, vllm_engine):
    """A share of stage 6's tasks are red-team prompts, self-instructed apart: the prompt guard flags them and they
    go on to be answered and revised (benign tasks it flags are dropped); stages 1-5 have none. What becomes of
    their answers is test_constitution's test_an_unsafe_rejected_answer_is_the_pair_cai_keeps: on the tiny model
    every answer to them runs past an affordable token limit."""
    from datasets import load_from_disk

    class Strict(MarkerGuard):  # every prompt unsafe (S1)
        def check_prompts(self, prompts):
            return [self._v(f"{p} poison") for p in prompts]

    m = _stage(6, "hhh", vllm_engine, tmp_path / "cache.sqlite", tmp_path / "data", n_tasks=4, rounds=1,
                  max_tokens=16, task_tokens=24, oversample=1.0, guard=Strict(), red_team_share=0.5,
                  policy=GuardPolicy.for_persona("hhh"))
    c = m["counts"]
    items = _items(tmp_path / "data", "hhh", 6)
    red = [it for it in items if it["source"] == "red-team"]
    assert c["items"]["red_team"] == len(red) == 2 and c["items"]["total"] == 4
    assert c["red_team"]["proposed"] > 0 and c["generation_requests"]["red_team"] > 0
    assert c["guard"]["prompts"]["red_team_flagged"]["S1"] == 2 and c["guard"]["prompts"]["drop"]["S1"] == 2
    assert all(not (it["reason"] or "").startswith("guard_prompts") and it["round_tokens"] for it in red)
    assert all(it["reason"] == "guard_prompts:blocked" for it in items if it["source"] != "red-team")
    _check_counts(m, load_from_disk(str(tmp_path / "data" / "hhh" / "stage6")))
    one = _stage(1, "hhh", vllm_engine, tmp_path / "cache.sqlite", tmp_path / "data", n_tasks=2, n_samples=2,
                    max_tokens=8, task_tokens=24, oversample=1.0, red_team_share=0.5)
    assert one["counts"]["items"]["red_team"] == 0
