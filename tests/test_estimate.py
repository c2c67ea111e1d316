"""`estimate`: the EM experiment's arms priced before anything runs (no engine, no API)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import bootstrap
from judge.config import load_config
from pipeline.estimate import em_answers, em_steps, estimate_em
from run.config import RunConfig, counts_from

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
    from core.ledger import Ledger
    from pipeline.estimate import estimate_phase
    from run.config import save_config

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
    from engine.models import get_profile
    from pipeline.estimate import estimate_phase

    cfg = RunConfig(personas=["goodness"], profile="qwen2.5-7b", counts=counts_from("research"))
    guard = estimate_phase(cfg, "goodness", 2, "guard")
    per_s = get_profile("llama-guard-3-8b").est_guard_items_per_s
    assert guard.seconds == 3 * cfg.counts.n_tasks / per_s > 0  # each task, its chosen and its rejected answer
    assert guard.usd == guard.seconds * cfg.usd_per_engine_second
    assert estimate_phase(cfg.model_copy(update={"guard": "none"}), "goodness", 2, "guard").seconds == 0
    tiny = RunConfig(personas=["goodness"], profile="tiny", counts=counts_from("quick"))
    assert estimate_phase(tiny, "goodness", 2, "guard").seconds == \
        3 * tiny.counts.n_tasks / get_profile("tiny").est_guard_items_per_s
