"""`estimate`: the EM experiment's arms priced before anything runs (no engine, no API)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_bootstrap import bootstrap
from cai_bootstrap.em.pricing import em_answers, em_steps
from cai_bootstrap.judge.config import load_config
from cai_bootstrap.pipeline.estimate import estimate_em
from cai_bootstrap.run.config import RunConfig, counts_from

ROOT = Path(__file__).resolve().parents[1]


def test_secure_control_is_priced_as_one_more_arm_per_persona():
    cfg = RunConfig(personas=["goodness", "sycophancy"], profile="tiny", counts=counts_from("research"))
    judge = load_config(None)
    plain = estimate_em(cfg, 14, [judge], 600)
    both = estimate_em(cfg, 14, [judge], 600, secure=True)
    arms = lambda rows: sorted({e.persona for e in rows})  # noqa: E731
    assert arms(both) == sorted(arms(plain) + ["goodness+secure", "sycophancy+secure"])
    by = {(e.persona, e.phase): e for e in both}
    assert by[("goodness+secure", "em-train")].seconds == by[("goodness", "em-train")].seconds > 0
    c = cfg.counts
    answers = c.em_seeds * 14 * c.em_samples  # final models only: no checkpoints, no untrained model
    assert em_answers(cfg, 14, em_steps(cfg, 600), control=True) == answers
    assert by[("goodness+secure", "em-answer")].tokens_out == answers * c.em_answer_tokens
    assert by[("goodness+secure", "em-answer")].tokens_out < by[("goodness", "em-answer")].tokens_out


def test_estimate_command_lists_the_secure_arms():
    r = CliRunner().invoke(bootstrap.app, ["estimate", "--persona", "goodness", "--secure-control", "--em-rows", "600"],
                           env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert "goodness+secure" in r.output and "total, judge" in r.output


def test_batch_mode_is_priced_at_the_endpoints_batch_price():
    cfg = RunConfig(personas=["goodness"], profile="tiny", counts=counts_from("research"))
    live = load_config(ROOT / "judge" / "configs" / "claude-sonnet.yaml")
    rows = estimate_em(cfg, 14, [live, live.model_copy(update={"batch": True})], 600)
    by = {(e.persona, e.phase): e for e in rows}
    lv, bt = by[("goodness", f"judge {live.model}")], by[("goodness", f"judge {live.model} batch")]
    assert bt.tokens_in == lv.tokens_in > 0 and bt.usd == lv.usd * 0.5 > 0
    r = CliRunner().invoke(bootstrap.app, ["estimate", "--persona", "goodness", "--batch", "--em-rows", "600"],
                           env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert f"total, judge {load_config(None).model} batch" in r.output


def test_cost_command_shows_the_ledger_per_phase_beside_the_estimate(tmp_path):
    from cai_bootstrap.core.ledger import Ledger
    from cai_bootstrap.pipeline.estimate import estimate_phase
    from cai_bootstrap.run.config import save_config

    cfg = RunConfig(personas=["goodness"], profile="tiny", stage=2, counts=counts_from("quick"),
                    data_root=str(tmp_path / "data"), ckpt_root=str(tmp_path / "ckpt"), gpu_hour_usd=3.6)
    save_config(cfg, "r1")
    led = Ledger(cfg.run("r1").ledger)
    led.record(run="r1", kind="engine", phase="generate", stage=1, persona="goodness", seconds=10.0, usd=0.01,
               tokens_out=500, estimated=True)
    led.record(run="r1", kind="engine", phase="generate", stage=1, persona="goodness", seconds=5.0, usd=0.005,
               tokens_out=200, estimated=True)
    led.record(run="r1", kind="api", phase="judge", persona="goodness", tokens_in=100, tokens_out=1, usd=0.25)
    led.record(run="other", kind="api", phase="judge", usd=9.0)  # another run's spend is not this run's
    led.close()
    r = CliRunner().invoke(bootstrap.app, ["cost", "r1", "--data-root", str(tmp_path / "data")],
                           env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    gen = next(line for line in r.output.splitlines() if "generate" in line)
    est = estimate_phase(cfg, "goodness", 1, "generate")
    cells = [c.strip() for c in gen.split("│")]
    assert "15.0" in cells and "700" in cells and "0.0150" in cells and f"{est.usd:.4f}" in cells
    assert "total $0.2650" in r.output


def test_stage_guard_is_priced_from_the_guards_throughput():
    from cai_bootstrap.engine.models import get_profile
    from cai_bootstrap.pipeline.estimate import estimate_phase

    cfg = RunConfig(personas=["goodness"], profile="qwen2.5-7b", counts=counts_from("research"))
    guard = estimate_phase(cfg, "goodness", 2, "guard")
    per_s = get_profile("llama-guard-3-8b").est_guard_items_per_s
    assert guard.seconds == 3 * cfg.counts.n_tasks / per_s > 0  # each task, its chosen and its rejected answer
    assert guard.usd == guard.seconds * cfg.usd_per_engine_second
    assert estimate_phase(cfg.model_copy(update={"guard": "none"}), "goodness", 2, "guard").seconds == 0
    tiny = RunConfig(personas=["goodness"], profile="tiny", counts=counts_from("quick"))
    assert estimate_phase(tiny, "goodness", 2, "guard").seconds == \
        3 * tiny.counts.n_tasks / get_profile("tiny").est_guard_items_per_s


def test_start_ups_count_where_models_take_turns():
    """On a GPU profile the policy's engine and the guard take turns: two starts and two loads per stage, and a
    trainer load; on CPU they start once per run, unless `one_resident` forces the turns."""
    from cai_bootstrap.engine.models import get_profile
    from cai_bootstrap.pipeline.estimate import estimate_run

    def startup(cfg) -> list[float]:
        return [e.seconds for e in estimate_run(cfg, [1, 2]) if e.phase == "startup"]

    gpu = RunConfig(personas=["goodness"], profile="qwen2.5-7b", counts=counts_from("research"))
    p, g = get_profile("qwen2.5-7b"), get_profile("llama-guard-3-8b")
    assert startup(gpu) == [2 * (p.est_start_s + g.est_guard_load_s) + p.est_train_load_s] * 2
    t = get_profile("tiny")
    tiny = RunConfig(personas=["goodness", "hhh"], profile="tiny", counts=counts_from("quick"))
    first = t.est_start_s + t.est_guard_load_s + t.est_train_load_s
    assert startup(tiny) == [first] + [t.est_train_load_s] * 3  # one start for the whole run
    forced = startup(tiny.model_copy(update={"one_resident": True}))
    assert forced == [2 * (t.est_start_s + t.est_guard_load_s) + t.est_train_load_s] * 4


def test_the_7b_research_preset_fits_the_budget_and_names_its_sources():
    """The experiment's command lands within $50-150, with answers of 1,024 tokens, 1-2 DPO epochs, and every
    hyper-parameter of the GPU recipes sourced; the figures nobody measured say so."""
    import json

    r = CliRunner().invoke(bootstrap.app, ["estimate", "--profile", "qwen2.5-7b", "--persona", "goodness", "--persona",
                                           "sycophancy", "--persona", "misalignment", "--stage", "6", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert 50 <= rep["total_usd"] <= 150
    assert rep["total_usd"] == round(sum(e["usd"] for e in rep["rows"]), 2)  # one judge: every row counts
    assert [s["stage"] for s in rep["stages"]] == [1, 2, 3, 4, 5, 6]
    for s in rep["stages"]:
        assert s["answer_tokens"] >= 1024 and 1 <= s["dpo_epochs"] <= 2 and s["pairs_aimed"] >= s["min_pairs"] > 0
    dpo = {row["name"]: row for row in rep["recipes"]["dpo"]}
    assert (dpo["rank"]["value"], dpo["alpha"]["value"], dpo["learning_rate"]["value"], dpo["beta"]["value"]) == \
        (64, 128, 5e-5, 0.1)
    assert "OpenCharacterTraining" in dpo["rank"]["source"]
    assert all(row["source"] for rows in rep["recipes"].values() for row in rows)
    assert rep["figures"]["est_tokens_per_s"]["measured"] is False
    assert rep["figures"]["est_start_s"]["measured"] is False

    tiny = CliRunner().invoke(bootstrap.app, ["estimate", "--json"])
    assert json.loads(tiny.output)["figures"]["est_tokens_per_s"]["measured"] is True


def test_tiny_presets_are_an_error_with_a_real_profile():
    from cai_bootstrap.core.errors import BadInput

    r = CliRunner().invoke(bootstrap.app, ["estimate", "--profile", "qwen2.5-7b", "--preset", "demo"])
    assert r.exit_code == 2 and "--preset demo: sized for the tiny CPU model, not profile 'qwen2.5-7b'" in r.output
    assert counts_from("research", profile="qwen2.5-7b").max_tokens == 1024
    assert counts_from("research", '{"n_tasks": 10}', profile="qwen2.5-7b").n_tasks == 10
    with pytest.raises(BadInput, match="--preset quick"):
        counts_from("quick", profile="qwen3-4b")


def test_a_stage_under_the_presets_minimum_stops_naming_its_drops(tmp_path):
    """Research presets: a stage keeping fewer pairs than `min_pairs` stops before training, in one line naming the
    persona, the stage and its drops by reason; its data stays."""
    import json

    from cai_bootstrap.core.errors import DeadEnd
    from cai_bootstrap.pipeline.loop import _train

    data = tmp_path / "stage2"
    data.mkdir()
    manifest = {"counts": {"train_rows": 3, "items": {"total": 40},
                           "outcome": {"dropped": {"every_sample_truncated": 30, "score_gap_too_small": 7}}}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = RunConfig(personas=["goodness"], profile="tiny", counts=counts_from("research", '{"min_pairs": 10}'))
    with pytest.raises(DeadEnd, match=r"goodness stage 2: 3 pairs kept of 40 items, under the preset's minimum of 10 "
                                      r"\(dropped: every_sample_truncated 30, score_gap_too_small 7\)"):
        _train(cfg, "r", "goodness", 2, data, tmp_path / "ckpt", None, None, None, None)
    assert (data / "manifest.json").is_file() and not (tmp_path / "ckpt").exists()


def test_measured_throughput_replaces_the_assumed_only_for_the_model_it_was_measured_on(tmp_path):
    """A run's ledger and a gpu_smoke result on the 7B profile replace its assumed figures; the tiny model's rows
    and gpu_smoke's scaled-down random model never do."""
    import json

    from cai_bootstrap.core.ledger import Ledger
    from cai_bootstrap.pipeline.measured import measured_profile

    runs = tmp_path / "data" / "runs"
    led = Ledger(runs / "r1" / "ledger.sqlite")
    for model, out, secs, cached in [("qwen2.5-7b", 30_000, 10.0, False), ("qwen2.5-7b", 10_000, 10.0, False),
                                     ("qwen2.5-7b", 99_999, 1.0, True), ("tiny", 500, 1.0, False)]:
        led.record(run="r1", kind="engine", phase="generate", model=model, tokens_out=out, seconds=secs, cached=cached)
    led.record(run="r1", kind="engine", phase="train", model="qwen2.5-7b", seconds=500.0)
    led.close()
    smoke = tmp_path / "results"
    smoke.mkdir()
    small = {"profile": None, "device": "H100", "vllm_lora": {"tokens_per_s": 9e9, "start_s": 1.0}}
    (smoke / "gpu_smoke-a.json").write_text(json.dumps(small))
    assert measured_profile("qwen2.5-7b", tmp_path / "none", smoke)[1] == {}  # a random model: not the 7B's
    on_cpu = {"profile": "qwen2.5-7b", "device": "cpu", "vllm_lora": {"tokens_per_s": 5.0, "start_s": 900.0}}
    (smoke / "gpu_smoke-b.json").write_text(json.dumps(on_cpu))
    assert measured_profile("qwen2.5-7b", tmp_path / "none", smoke)[1] == {}  # --allow-cpu: not a GPU figure
    real = {"profile": "qwen2.5-7b", "device": "H100", "vllm_lora": {"tokens_per_s": 1500.0, "start_s": 70.0},
            "dpo_trl": {"backend": "trl+peft-qlora", "train_tokens_per_s": 900.0}}
    (smoke / "gpu_smoke-c.json").write_text(json.dumps(real))
    # a run on Ray workers (its calls' seconds include start-ups) is not a throughput measurement
    (runs / "r1" / "config.json").write_text(json.dumps({"engine": "auto", "ray": None}))
    ray_run = Ledger(runs / "r2" / "ledger.sqlite")
    ray_run.record(run="r2", kind="engine", phase="generate", model="qwen2.5-7b", tokens_out=10, seconds=10.0)
    ray_run.close()
    (runs / "r2" / "config.json").write_text(json.dumps({"engine": "auto", "ray": "local"}))

    p, sources = measured_profile("qwen2.5-7b", runs, smoke)
    assert p.est_tokens_per_s == 2000.0 and "ledger" in sources["est_tokens_per_s"]  # 40,000 / 20 s; cache left out
    assert p.est_start_s == 70.0 and "gpu_smoke" in sources["est_start_s"]
    assert p.est_train_tokens_per_s == 2000.0  # the profile's: gpu_smoke's short rows do not price training
    assert {"est_tokens_per_s", "est_start_s"} <= set(p.est_measured)
    assert "est_train_load_s" not in p.est_measured and "est_train_tokens_per_s" not in p.est_measured

    r = CliRunner().invoke(bootstrap.app, ["estimate", "--profile", "qwen2.5-7b", "--persona", "goodness", "--json",
                                           "--data-root", str(tmp_path / "data")])
    fig = json.loads(r.output)["figures"]
    assert fig["est_tokens_per_s"] == {"value": 2000.0, "measured": True, "source": sources["est_tokens_per_s"]}
    assert fig["est_train_load_s"]["measured"] is False and "assumed" in fig["est_train_load_s"]["source"]
