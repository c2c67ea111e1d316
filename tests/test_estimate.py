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
