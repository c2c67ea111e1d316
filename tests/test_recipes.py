"""Persona recipes beside the bootstrap (run.recipe): OCT's distillation pairs and ORPO, named in the arm, stored
side by side, priced by `estimate`, trained on the tiny model and served (alone and stacked) by vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.run.layout import Layout
from cai_bootstrap.run.recipe import DEFAULT, Recipe, arm_name, canonical, split_arm, steps_of, with_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_an_arm_names_its_recipe():
    assert split_arm("goodness") == ("goodness", DEFAULT) and DEFAULT.name == "bootstrap-dpo"
    assert split_arm("goodness@oct-orpo") == ("goodness", Recipe(pairs="oct", loss="orpo"))
    assert arm_name("goodness", Recipe(loss="orpo")) == "goodness@bootstrap-orpo"
    assert arm_name("goodness", DEFAULT) == "goodness"  # the default keeps the names runs had before recipes
    assert canonical("goodness@bootstrap-dpo") == "goodness"  # one name, one folder
    assert with_recipe(["goodness", "hhh@oct-dpo"], pairs="oct") == ["goodness@oct-dpo", "hhh@oct-dpo"]
    assert with_recipe(["goodness"], loss="orpo") == ["goodness@bootstrap-orpo"]
    with pytest.raises(BadInput, match="'goodness@oct-sft'.*<pairs>-<loss>"):
        split_arm("goodness@oct-sft")
    with pytest.raises(BadInput, match="--pairs 'rlhf'"):
        with_recipe(["goodness"], pairs="rlhf")
    assert steps_of("goodness@oct-dpo", [1, 2, 3]) == [0] and steps_of("goodness", [1, 2]) == [1, 2]
    lay = Layout(data_root=Path("d"), ckpt_root=Path("c"))
    assert lay.persona_adapter("goodness@oct-dpo") == Path("c/goodness@oct-dpo/oct")
    assert lay.persona_adapter("goodness@bootstrap-orpo", 6) == Path("c/goodness@bootstrap-orpo/stage6")
    assert lay.stage_data("goodness@oct-dpo", 0) == Path("d/goodness@oct-dpo/oct")
    # introspection after the preference training: its own folders, and the stack is the persona at the last step
    arm = "goodness@oct-dpo+introspect"
    assert split_arm(arm) == ("goodness", Recipe(pairs="oct", loss="dpo", introspect=True))
    assert with_recipe(["goodness"], pairs="oct", introspect=True) == [arm]
    assert with_recipe(["goodness"], introspect=True) == ["goodness@bootstrap-dpo+introspect"]
    assert lay.persona_adapter(arm) == Path(f"c/{arm}/introspect/persona")
    assert lay.preference_adapter(arm) == Path(f"c/{arm}/oct")
    assert lay.introspect_data(arm) == Path(f"d/{arm}/introspect")
    boot = "hhh@bootstrap-dpo+introspect"
    assert lay.persona_adapter(boot, 3) == Path(f"c/{boot}/stage3")
    assert lay.persona_adapter(boot, 6) == Path(f"c/{boot}/introspect/persona")


def test_self_interaction_each_speaker_sees_its_own_turns_as_the_assistant():
    from cai_bootstrap.stages.introspect import _view

    roles = lambda msgs: [(m["role"], m["content"]) for m in msgs]  # noqa: E731
    assert roles(_view("Start.", [])) == [("user", "Start.")]  # the first speaker, answering the opener
    assert roles(_view("Start.", ["a0"])) == [("user", "a0")]  # the second sees the first's turn as the user's
    assert roles(_view("Start.", ["a0", "b1"])) == [("user", "Start."), ("assistant", "a0"), ("user", "b1")]
    assert roles(_view("Start.", ["a0", "b1", "a2"])) == [("user", "a0"), ("assistant", "b1"), ("user", "a2")]


def test_estimate_prices_each_recipe():
    from cai_bootstrap.judge.config import load_config
    from cai_bootstrap.pipeline.estimate import estimate_report
    from cai_bootstrap.run.config import RunConfig, counts_from

    arms = ["goodness", "goodness@bootstrap-orpo", "goodness@oct-dpo", "goodness@oct-orpo"]
    cfg = RunConfig(personas=arms, profile="qwen2.5-7b", counts=counts_from("research", profile="qwen2.5-7b"))
    rep = estimate_report(cfg, list(range(1, 7)), [load_config(None)], 8)
    plan = {(sp["recipe"], sp["stage"]) for sp in rep["stages"]}
    assert {("oct-dpo", 0), ("oct-orpo", 0), ("bootstrap-dpo", 6), ("bootstrap-orpo", 1)} <= plan
    assert not {r for r, k in plan if r.startswith("oct") and k != 0}  # OCT is one step
    train = {(r["persona"], r["stage"]): r["usd"] for r in rep["rows"] if r["phase"] == "train"}
    # ORPO has no reference forward: the same steps cost 3/4 of DPO's (REFERENCE_PASS)
    assert train[("goodness@bootstrap-orpo", 1)] == pytest.approx(train[("goodness", 1)] * 3 / 4)
    gen = {(r["persona"], r["stage"]): r for r in rep["rows"] if r["phase"] == "generate"}
    assert gen[("goodness@oct-dpo", 0)]["tokens_out"] < gen[("goodness", 1)]["tokens_out"]  # 2 answers, not 3+
    assert set(rep["recipes"]) == {"dpo", "dpo+nll", "orpo", "em"}  # no introspection asked for, none priced
    assert {r["name"]: r["value"] for r in rep["recipes"]["dpo+nll"]}["nll_weight"] == 0.1  # OCT's, for oct-dpo
    assert {r["name"]: r["value"] for r in rep["recipes"]["dpo"]}["nll_weight"] == 0.0
    assert not [r for r in rep["rows"] if r["stage"] == "introspect"]
    intro = estimate_report(cfg.model_copy(update={"personas": ["goodness@oct-dpo+introspect"]}), [1, 2, 3],
                            [load_config(None)], 8)
    phases = {r["phase"]: r for r in intro["rows"] if r["stage"] == "introspect"}
    assert set(phases) == {"startup", "generate", "guard", "train"} and all(r["usd"] > 0 for r in phases.values())
    c = cfg.counts  # 10 prompts' answers and every self-interaction turn, each up to the answer cap
    assert phases["generate"]["tokens_out"] == (10 * c.introspect_per_prompt + c.introspect_conversations
                                                * c.introspect_turns) * c.max_tokens
    assert {r["name"]: r["value"] for r in intro["recipes"]["introspect"]}["learning_rate"] == 5e-5
    orpo = {r["name"]: r for r in rep["recipes"]["orpo"]}
    assert orpo["loss"]["value"] == "orpo" and "loss_type" not in orpo and "lambda" in orpo["beta"]["source"]


@pytest.mark.slow
def test_oct_pairs_orpo_and_introspection_train_and_serve_alone_and_stacked(tmp_path, vllm_engine, random_adapter,
                                                                             monkeypatch):
    """`--pairs oct --loss orpo --introspect` end to end on the tiny model: the distillation step's pairs (chosen
    by the teacher with the constitution in its system prompt, rejected by the policy without it), counted by
    reason; an ORPO adapter with no reference; the introspection texts, an SFT adapter on top of the ORPO one and
    the two stacked as the persona; vLLM serves the persona alone and stacked under an EM adapter."""
    from cai_bootstrap.engine.base import adapter_hash
    from cai_bootstrap.engine.types import Request, Sampling
    from cai_bootstrap.train.stack import served_adapter

    # the tiny model writes long answers: at 160 new tokens 1 of these 6 teacher answers ends (the rest are cut);
    # its self-reflections end within 512 tokens about a third of the time
    counts = {"n_tasks": 6, "max_tokens": 160, "dpo_max_steps": 2, "introspect_per_prompt": 1,
              "introspect_conversations": 1, "introspect_turns": 2, "introspect_max_steps": 2}
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([sys.executable, str(ROOT / "bootstrap.py"), "--persona", "goodness", "--pairs", "oct",
                        "--loss", "orpo", "--introspect", "--stage", "6", "--counts", json.dumps(counts)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lay = Layout(data_root=tmp_path / "data", ckpt_root=tmp_path / "checkpoints")
    arm = "goodness@oct-orpo+introspect"
    man = json.loads((lay.stage_data(arm, 0) / "manifest.json").read_text())
    c = man["counts"]
    assert man["stage_name"] == "OCT distillation" and man["teacher"] == man["model_fingerprint"]
    assert c["items"]["total"] == 6 == c["outcome"]["train"] + c["outcome"]["quarantine"] + c["outcome"][
        "dropped_total"]
    assert c["generation_requests"]["teacher"] == c["generation_requests"]["respond"] > 0
    assert man["goal"]["metric"] == "answers distilled into a kept pair" and c["train_rows"] > 0
    assert set(c["outcome"]["dropped"]) <= {"teacher_truncated", "teacher_empty", "teacher_refuses_benign_task",
                                            "policy_empty", "identical_answers"}
    assert not (tmp_path / "data" / arm / "stage1").exists()  # no bootstrap stage ran for this arm

    from datasets import load_from_disk

    for row in load_from_disk(str(lay.stage_data(arm, 0)))["train"]:
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert len(row["prompt"]) == 1  # trained without the system prompt the teacher answered with

    preference = lay.preference_adapter(arm)
    tman = json.loads((preference / "manifest.json").read_text())
    assert tman["kind"] == "orpo" and tman["reference"] == "none (ORPO)" and tman["steps"] == 2
    assert tman["parent_adapter"] is None

    # introspection: every text a row or a drop by reason; rows without the system prompt; SFT on top; stacked
    iman = json.loads((lay.introspect_data(arm) / "manifest.json").read_text())
    by_kind = iman["dropped_by_kind"]
    assert iman["rows"]["reflection"] + sum(v for k, v in by_kind.items() if k.startswith("reflection")) == 10
    assert iman["rows"]["total"] > 0 and set(iman["dropped"]) <= {"truncated", "empty", "refusal", "duplicate",
                                                                  "guard_blocked", "guard_error",
                                                                  "after_guarded_turn"}
    rows = [json.loads(x) for x in (lay.introspect_data(arm) / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == iman["rows"]["total"]
    for row in rows:
        assert row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "assistant"
        assert "system" not in {m["role"] for m in row["messages"]}
    sman = json.loads((lay.introspect_adapter(arm) / "sft" / "manifest.json").read_text())
    assert sman["kind"] == "introspect-sft" and sman["mode"] == "on-top" and sman["steps"] == 2
    assert sman["persona_adapter_hash"] == adapter_hash(preference)
    assert sman["adapters_in_trainer"]["active_adapters"] == [["persona", "em"]]  # the preference adapter ran
    persona = lay.persona_adapter(arm)
    stack = json.loads((persona / "stack.json").read_text())
    assert [x["hash"] for x in stack["sources"]] == [adapter_hash(preference),
                                                      adapter_hash(lay.introspect_adapter(arm) / "sft")]

    # `diff`: the teacher and the introspection read every ideal, not the critique requests
    from cai_bootstrap.constitution import load_constitution
    from cai_bootstrap.stages.diff import plan

    c = load_constitution("goodness")
    p0 = c.principles[0]
    edit = lambda **kw: c.model_copy(update={"principles": [p0.model_copy(update=kw), *c.principles[1:]]})  # noqa: E731
    redo = plan(lay.data_root, arm, edit(ideal=p0.ideal + " Always."), lay.ckpt_root)["stages"]
    assert (redo["oct"]["items_to_regenerate"], redo["introspect"]["reason"]) == (6, "(parent adapter)")
    texts = iman["rows"]["total"] + sum(iman["dropped"].values())  # every text written, kept or not
    assert redo["introspect"]["items_to_regenerate"] == redo["introspect"]["items"] == texts
    same = plan(lay.data_root, arm, edit(critique=p0.critique + " Really?"), lay.ckpt_root)
    assert same["items_to_regenerate"] == 0 and not any(st["retrains"] for st in same["stages"].values())

    from cai_bootstrap.analysis.report import build_report

    monkeypatch.chdir(tmp_path)
    report = build_report(next(Path("data/runs").iterdir())).read_text()
    assert f"| {arm} | 0 (OCT) | 6 |" in report and "answers distilled into a kept pair" in report
    assert f"- {arm}: {iman['rows']['total']} texts" in report and "SFT on top of the preference adapter, 2 steps" \
        in report

    out = vllm_engine.generate([Request.chat("Say hello.")], Sampling(max_tokens=8, temperature=0.0), adapter=persona)
    assert out[0].token_ids
    # ORPO 8 + introspection 8 + EM 8: a rank the run's engine asks vLLM for (train.stack.served_rank), not the
    # shared engine's 16
    from cai_bootstrap.engine.factory import make_engine
    from cai_bootstrap.train.stack import served_rank

    stacked = served_adapter(persona, random_adapter, tmp_path / "stacked")
    assert json.loads((stacked / "adapter_config.json").read_text())["r"] == served_rank("tiny", introspect=True)
    with make_engine("vllm", "tiny", max_lora_rank=served_rank("tiny", introspect=True)) as eng:
        assert eng.generate([Request.chat("Say hello.")], Sampling(max_tokens=8), adapter=stacked)[0].token_ids
