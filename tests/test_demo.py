"""`demo --quick` end to end from an empty directory, as a newcomer runs it (real vLLM, TRL, PEFT; the judge
is a local OpenAI-compatible server here, the embedded one has its own test): one generation engine serves
every phase, EM per arm is scored with intervals, the report has its sections, demo.json keeps the times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fault_server import FaultServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the quick preset, smaller: stage 1 must keep a pair (min_gap as in test_pipeline), six anchors of six kinds
COUNTS = {"n_tasks": 3, "n_samples": 3, "rounds": 1, "max_tokens": 64, "dpo_max_steps": 1, "min_gap": 0.05,
          "em_rows": 8, "em_max_steps": 2, "em_save_every": 1, "em_curve_questions": 1, "em_answer_tokens": 16,
          "em_anchors": 6}


@pytest.mark.slow
def test_quick_demo_runs_every_phase_on_one_engine(tmp_path):
    with FaultServer() as srv:
        judge = srv.judge_config(tmp_path / "judge.yaml")
        env = {**os.environ, "COLUMNS": "200", "CAI_TEST_JUDGE_KEY": "test-judge-key"}
        r = subprocess.run([sys.executable, str(ROOT / "bootstrap.py"), "demo", "--quick", "--counts",
                            json.dumps(COUNTS), "--judge-config", str(judge)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=1500, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = next((tmp_path / "data" / "runs").iterdir())
    demo = json.loads((run / "demo.json").read_text())
    # the bootstrap's engine answers the EM questions too: one vLLM start in the whole demo (each is 20-30 s)
    assert demo["starts"] == {"vllm_engine": 1, "judge_server": 0}, demo
    assert set(demo["phases_s"]) == {"bootstrap", "em", "total"} and demo["personas"] == ["goodness"]
    assert "1 vLLM engine and 0 judge server started" in r.stdout

    em = json.loads((run / "em" / "summary.json").read_text())
    assert set(em["arms"]) == {"goodness", "base"}
    for arm in em["arms"].values():
        rate = arm["em_rate"]
        assert arm["scored"] > 0 and rate["n"] == arm["scored"] and rate["lo"] <= rate["value"] <= rate["hi"]
    assert em["anchors"]["n"] == 6 and em["anchors"]["of"] >= 60  # a share of the anchors, every kind

    report = (run / "report.md").read_text()
    for section in ("## Stages", "### Stage 6 sample", "## Emergent misalignment", "## Cost"):
        assert section in report, section
    assert f"the project's 6 of its {em['anchors']['of']} anchors" in report
    sample = report.split("### Stage 6 sample")[1].split("\n## ")[0]  # real texts: a pair, or a dropped item's
    assert "- chosen: '" in sample or ("- answer: '" in sample and "not trained on" in sample), sample
    kept = [k for k in range(1, 7) if json.loads((tmp_path / "data" / "goodness" / f"stage{k}" / "manifest.json")
                                                 .read_text())["counts"]["outcome"]["train"]]
    assert ("- chosen: '" in sample) == bool(kept), (kept, sample)  # a stage kept a pair (stage 1 must): shown
    assert (run / "run.log").stat().st_size > 0  # the libraries' output, off the console
    assert "Loading safetensors" not in r.stderr and "Loading safetensors" in (run / "run.log").read_text()
