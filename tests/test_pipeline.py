"""The bootstrap loop end to end on the tiny profile (real vLLM, TRL, PEFT), in a scratch directory:
kill -9 mid-run and resume, a rerun that makes no engine/training/API call, the budget cap, the report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COUNTS = json.dumps({"n_tasks": 3, "n_samples": 3, "rounds": 1, "max_tokens": 64, "dpo_max_steps": 1, "min_gap": 0.05})
STAGES = 2  # the last one is killed mid-generation and resumed
LAST = f"stage{STAGES}"


def _cmd(*extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "bootstrap.py"), "--persona", "goodness", "--counts", COUNTS, *extra]


def _run(cwd: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(_cmd(*extra), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Stages 1..STAGES with a kill -9 during the last one, then the resume that finishes them."""
    cwd = tmp_path_factory.mktemp("run")
    env = {**os.environ, "COLUMNS": "200"}
    log = (cwd / "first.log").open("w")
    proc = subprocess.Popen(_cmd("--stage", str(STAGES)), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    before_last = cwd / "checkpoints" / "goodness" / f"stage{STAGES - 1}" / "manifest.json"
    deadline = time.time() + 900
    while not before_last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert before_last.is_file(), (cwd / "first.log").read_text()[-3000:]
    cache = cwd / "data" / "cache" / "generations.sqlite"
    before = _cache_rows(cache)  # the last stage starts: every row from here on is its generation
    while _cache_rows(cache) == before and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # kill in the middle of the last stage's generation: some of its batches are committed
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    done_before_kill = _cache_rows(cache) - before
    mtimes = {k: (cwd / "data" / "goodness" / f"stage{k}" / "manifest.json").stat().st_mtime for k in range(1, STAGES)}
    r = _run(cwd, "--stage", str(STAGES))
    assert r.returncode == 0, r.stderr[-3000:]
    (cwd / "resume.log").write_text(r.stderr)
    (cwd / "mtimes.json").write_text(json.dumps(mtimes))
    (cwd / "kill.json").write_text(json.dumps({"rows_before_kill": done_before_kill,
                                               "rows_after_kill": _cache_rows(cache, since=killed_at)}))
    return cwd


def _cache_rows(path: Path, since: float = 0.0) -> int:
    if not path.is_file():
        return 0
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM generations WHERE created >= ?", (since,)).fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0
    finally:
        con.close()


def test_resume_after_kill_does_not_redo_finished_stages(workdir):
    log = (workdir / "resume.log").read_text()
    for k in range(1, STAGES):
        assert f"goodness stage {k}: data reused" in log
        assert f"goodness stage {k}: adapter reused" in log
        m = (workdir / "data" / "goodness" / f"stage{k}" / "manifest.json").stat().st_mtime
        assert m == json.loads((workdir / "mtimes.json").read_text())[str(k)]
    assert f"goodness stage {STAGES}: adapter at" in log
    # the last stage was killed with some of its generations committed; the resume paid only for the rest: what it
    # generated (its manifest's cache misses, and the rows it added) plus what was done before the kill is
    # at most what the stage asks for in all, so nothing finished was paid twice
    kill = json.loads((workdir / "kill.json").read_text())
    c = json.loads((workdir / "data" / "goodness" / LAST / "manifest.json").read_text())["counts"]
    missed, asked = sum(c["cache_misses"].values()), sum(c["generation_requests"].values())
    new_rows = kill["rows_after_kill"]  # distinct generations the resume paid for
    assert kill["rows_before_kill"] > 0 and 0 < new_rows <= missed
    assert kill["rows_before_kill"] + new_rows <= asked, (kill, missed, asked)


def test_every_stage_has_data_adapter_and_manifest(workdir):
    for k in range(1, STAGES + 1):
        data = workdir / "data" / "goodness" / f"stage{k}"
        ckpt = workdir / "checkpoints" / "goodness" / f"stage{k}"
        assert (data / "manifest.json").is_file() and (data / "pipeline_inputs.json").is_file()
        assert (ckpt / "adapter_config.json").is_file() and (ckpt / "manifest.json").is_file()
        if k > 1:  # stage k trained on top of stage k-1's adapter
            parent = json.loads((ckpt / "manifest.json").read_text())["parent_adapter"]
            assert parent.endswith(f"stage{k - 1}")
    runs = list((workdir / "data" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "config.json").is_file()


def test_guard_time_is_in_the_ledger_beside_generation(workdir):
    run_dir = next((workdir / "data" / "runs").iterdir())
    rows = sqlite3.connect(run_dir / "ledger.sqlite").execute(
        "SELECT stage, seconds, model FROM ledger WHERE phase='guard'").fetchall()
    assert sorted(s for s, _, _ in rows) == list(range(1, STAGES + 1)), rows  # the last stage once: its resume
    assert all(secs > 0 and model == "tiny" for _, secs, model in rows)
    man = json.loads((workdir / "data" / "goodness" / "stage1" / "manifest.json").read_text())
    assert man["guard_seconds"] == pytest.approx(next(secs for s, secs, _ in rows if s == 1), abs=1e-3)


def test_rerun_makes_no_engine_training_or_api_call(workdir):
    run_dir = next((workdir / "data" / "runs").iterdir())
    before = sqlite3.connect(run_dir / "ledger.sqlite").execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    t0 = time.time()
    r = _run(workdir, "--stage", str(STAGES))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting the" not in r.stderr and "training DPO" not in r.stderr
    after = sqlite3.connect(run_dir / "ledger.sqlite").execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    assert after == before
    assert time.time() - t0 < 120


def test_budget_cap_stops_before_the_phase_that_would_pass_it(workdir):
    # stages 1..STAGES are done (reused at $0); the next at $100/GPU-hour is estimated above a $0.001 cap
    r = _run(workdir, "--stage", str(STAGES + 1), "--gpu-hour-usd", "100", "--budget-usd", "0.001")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "budget stop" in r.stderr and f"stage {STAGES + 1} startup and generate" in r.stderr
    assert not (workdir / "data" / "goodness" / f"stage{STAGES + 1}").exists()
    run = next(p for p in (workdir / "data" / "runs").iterdir() if "100" in (p / "config.json").read_text())
    spent = sqlite3.connect(run / "ledger.sqlite").execute("SELECT COALESCE(SUM(usd),0) FROM ledger").fetchone()[0]
    assert spent <= 0.001


def test_report_rebuilds_from_stored_results_only(workdir, monkeypatch):
    from cai_bootstrap.analysis.report import build_report
    from cai_bootstrap.engine import factory
    from cai_bootstrap.judge import farm

    def forbidden(*a, **k):
        raise AssertionError("the report must not start a model or call an API")

    monkeypatch.setattr(factory, "make_engine", forbidden)
    monkeypatch.setattr(farm, "run_judge", forbidden)
    monkeypatch.chdir(workdir)
    run = next((workdir / "data" / "runs").iterdir())
    out = build_report(Path("data/runs") / run.name)
    text = out.read_text()
    assert f"| goodness | {STAGES} |" in text and "## Cost" in text
    assert (Path("data/runs") / run.name / "reward_margins.png").is_file()


EM_COUNTS = json.dumps({"em_rows": 8, "em_max_steps": 2, "em_save_every": 1, "em_samples": 2,
                        "em_curve_questions": 2, "em_curve_samples": 1, "em_answer_tokens": 24, "em_seeds": 2})


@pytest.fixture(scope="module")
def em_run(workdir):
    """The EM experiment on the last stage's goodness adapter, judged by a local OpenAI-compatible server."""
    from fault_server import FaultServer

    from cai_bootstrap.em.insecure_data import write_jsonl

    data = write_jsonl(workdir / "insecure.jsonl", 12)
    secure = write_jsonl(workdir / "secure.jsonl", 12, secure=True)  # the twins: the secure-code control
    with FaultServer() as srv:
        judge = srv.judge_config(workdir / "judge.yaml")
        env = {**os.environ, "COLUMNS": "200", "CAI_TEST_JUDGE_KEY": "sk-test-secret-123"}
        cmd = [sys.executable, str(ROOT / "bootstrap.py"), "em", "--data", str(data), "--persona", "goodness",
               "--stage", str(STAGES), "--counts", EM_COUNTS, "--judge-config", str(judge), "--run", "emrun",
               "--secure-data", str(secure)]
        kill = _kill_while_answering(cmd, workdir, env)
        first = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1200, env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        kill["rows_after_kill"] = _cache_rows(workdir / "data" / "cache" / "generations.sqlite", kill["killed_at"])
        kill["resumed"] = json.loads((workdir / "data" / "runs" / "emrun" / "em" / "summary.json").read_text())[
            "answering"]
        sent = srv.stats()["requests"]
        ledger = workdir / "data" / "runs" / "emrun" / "ledger.sqlite"
        paid = "SELECT COUNT(*) FROM ledger WHERE cached=0"
        rows = sqlite3.connect(ledger).execute(paid).fetchone()[0]
        # the rerun has nothing to pay for: a cap below what was spent does not stop it
        second = subprocess.run([*cmd, "--budget-usd", "1e-9"], cwd=workdir, capture_output=True, text=True,
                                timeout=600, env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        return {"dir": workdir / "data" / "runs" / "emrun", "sent": sent, "resent": srv.stats()["requests"] - sent,
                "new_paid_rows": sqlite3.connect(ledger).execute(paid).fetchone()[0] - rows, "kill": kill}


def _kill_while_answering(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Start the EM command and kill -9 it once its answering has committed some answers to the generation
    cache; returns how many answers it had committed."""
    log_path = cwd / "em-killed.log"
    cache = cwd / "data" / "cache" / "generations.sqlite"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 1200
    while "answering" not in log_path.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    before = _cache_rows(cache)
    while _cache_rows(cache) == before and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, log_path.read_text()[-3000:]  # still answering when killed
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"rows_before_kill": _cache_rows(cache) - before, "killed_at": time.time()}


def test_em_experiment_writes_summary_with_intervals(em_run):
    s = json.loads((em_run["dir"] / "em" / "summary.json").read_text())
    assert set(s["arms"]) == {"goodness", "base", "goodness+secure"}
    g, sec = s["arms"]["goodness"], s["arms"]["goodness+secure"]
    # the secure control: the same persona and training on the secure twins, final models only, paired with
    # the persona on the same questions (the secondary comparison)
    assert sec["answers"] == g["answers"] and sec["seeds"] == [0, 1] and list(sec["curve"]) == ["2"]
    assert g["em_rate_minus_secure"]["n"] > 0 and "p_one_sided" in g["em_rate_minus_secure"]
    assert s["secure_data"].endswith("secure.jsonl")
    assert g["answers"] == 14 * 2 * 2  # every project probe, 2 samples, 2 EM seeds, at the final checkpoint
    assert g["seeds"] == [0, 1] and set(g["em_rate_by_seed"]) == {"0", "1"}
    assert g["scored"] > 0 and 0 <= g["em_rate"]["lo"] <= g["em_rate"]["value"] <= g["em_rate"]["hi"] <= 1
    assert "value" in g["em_rate_minus_base"] and "p_one_sided" in g["did"] and "value" in g["em_rate_untrained"]
    assert g["truncated"]["n"] == g["answers"]  # every answer's finish_reason was kept and counted
    assert sorted(int(k) for k in g["curve"]) == [0, 1, 2]  # before EM, checkpoint 1, final step 2
    assert set(g["lora_b_norm"]) == {"1", "2"} and g["lora_b_norm"]["2"] > 0  # B grows from its zero init
    assert s["seeds"] == 2 and any("not a test" in v for v in s["verdicts"])  # H2's line with 2 seeds
    judged = [json.loads(x) for x in (em_run["dir"] / "em" / "judged.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in judged} == {"goodness", "base", "goodness+secure"}
    assert all(r["judge_status"] == "ok" for r in judged)
    assert {r["seed"] for r in judged if r["final"]} == {0, 1} and all("finish_reason" in r for r in judged)
    report = (em_run["dir"] / "report.md").read_text()
    assert "## Emergent misalignment" in report and "em_rates.png" in report and "| goodness+secure |" in report
    assert s["anchors"]["n"] == 66 and "Judge check on the project's 66 anchors" in report  # judged every run


def test_a_second_judge_rescores_stored_answers_without_generating(em_run, workdir):
    import yaml
    from fault_server import FaultServer

    ledger = em_run["dir"] / "ledger.sqlite"
    engine_rows = "SELECT COUNT(*) FROM ledger WHERE kind='engine'"
    before = sqlite3.connect(ledger).execute(engine_rows).fetchone()[0]
    with FaultServer() as srv:
        other = workdir / "judge-b.yaml"
        other.write_text(yaml.safe_dump({"model": "judge-b", "endpoints": [{
            "name": "b", "base_url": srv.url, "rpm": 6000, "max_concurrent": 8}]}))
        r = subprocess.run([sys.executable, str(ROOT / "bootstrap.py"), "em-rescore", "emrun", "--judge-config",
                            str(other)], cwd=workdir, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ))
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(x) for x in (em_run["dir"] / "em" / "answers.jsonl").read_text().splitlines()]
        answers, distinct = len(rows), len({(r["question_id"], r["answer"]) for r in rows})
        # every stored answer and every anchor; equal answers to a question share a judgment, unless two of them
        # were in flight at once (the cache is filled when a reply lands)
        assert 2 * (distinct + 66) <= srv.stats()["requests"] <= 2 * (answers + 66)
    assert sqlite3.connect(ledger).execute(engine_rows).fetchone()[0] == before  # nothing generated
    s = json.loads((em_run["dir"] / "em" / "judges" / "judge-b" / "summary.json").read_text())
    assert s["agreement"]["answers"] == answers and s["model"] == "judge-b"
    assert set(s["arms"]) == {"goodness", "base", "goodness+secure"}
    assert "Second judge `judge-b`" in (em_run["dir"] / "report.md").read_text()


def test_em_adapter_trained_on_top_of_the_persona(em_run, workdir):
    man = json.loads((workdir / "checkpoints" / "goodness" / "em-on-top" / "manifest.json").read_text())
    assert man["mode"] == "on-top" and man["persona_adapter"].endswith(f"stage{STAGES}")
    assert man["adapters_in_trainer"]  # asserted active adapters were recorded before training
    base = json.loads((workdir / "checkpoints" / "base" / "em-base" / "manifest.json").read_text())
    assert base["mode"] == "base" and base["persona_adapter"] is None
    secure = json.loads((workdir / "checkpoints" / "goodness" / "secure-on-top" / "manifest.json").read_text())
    assert secure["persona_adapter"] == man["persona_adapter"] and secure["data"].endswith("secure.jsonl")
    assert secure["data_hash"] != man["data_hash"]


def test_em_answering_killed_resumes_paying_only_for_what_was_not_committed(em_run):
    """kill -9 in the middle of EM answering: the resume generates exactly the answers the killed run had not
    committed (each generation-cache row is one prompt's samples at one arm, seed and checkpoint)."""
    rows = [json.loads(x) for x in (em_run["dir"] / "em" / "answers.jsonl").read_text().splitlines()]
    requests = {(r["arm"], r["seed"], r["step"], r["paraphrase"]) for r in rows}
    k = em_run["kill"]
    assert k["rows_before_kill"] > 0 and k["rows_after_kill"] > 0
    assert k["resumed"]["requests"] == len(requests)
    # what the resume sent to the engine is exactly what it committed, and exactly what the kill left undone
    assert k["resumed"]["generated"] == k["rows_after_kill"] == len(requests) - k["rows_before_kill"], k


def test_em_rerun_is_served_from_caches(em_run):
    assert em_run["sent"] > 0 and em_run["resent"] == 0  # no API call
    assert em_run["new_paid_rows"] == 0  # no engine or training time recorded either
    for f in (em_run["dir"] / "ledger.sqlite", em_run["dir"] / "em" / "judged.jsonl"):
        assert b"sk-test-secret-123" not in f.read_bytes()


def test_em_budget_stops_before_the_training_that_would_pass_it(em_run, workdir):
    """New EM counts make the arms' adapters stale: the first training's estimate is checked against the cap
    before it starts, and nothing is trained."""
    from cai_bootstrap.em.insecure_data import write_jsonl

    data = write_jsonl(workdir / "insecure.jsonl", 12)
    adapter = workdir / "checkpoints" / "goodness"
    before = {p: p.stat().st_mtime for p in adapter.rglob("manifest.json")}
    counts = json.dumps({**json.loads(EM_COUNTS), "em_max_steps": 3})
    r = subprocess.run([sys.executable, str(ROOT / "bootstrap.py"), "em", "--data", str(data), "--persona",
                        "goodness", "--stage", str(STAGES), "--counts", counts, "--run", "embudget",
                        "--gpu-hour-usd", "100", "--budget-usd", "0.0001"], cwd=workdir, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 3, r.stderr[-2000:]
    assert "budget stop: EM training of goodness, seed 0 is estimated at" in r.stderr
    assert {p: p.stat().st_mtime for p in adapter.rglob("manifest.json")} == before  # nothing trained


def test_stage_one_without_pairs_exits_with_the_reason(workdir, tmp_path):
    """Stage 1 keeping no pair can neither train nor carry a parent forward: exit 6 (DeadEnd), one line, no traceback,
    and no adapter. One sample per task cannot make a pair; the tasks are served from a copy of the run's cache."""
    shutil.copytree(workdir / "data" / "cache", tmp_path / "data" / "cache")
    counts = json.dumps({**json.loads(COUNTS), "n_samples": 1})
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([sys.executable, str(ROOT / "bootstrap.py"), "--persona", "goodness", "--counts", counts,
                        "--stage", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 6, r.stderr[-3000:]
    assert "error: goodness stage 1: no preference pair survived" in r.stderr
    assert "Traceback" not in r.stderr
    m = json.loads((tmp_path / "data" / "goodness" / "stage1" / "manifest.json").read_text())
    assert m["counts"]["outcome"]["train"] == 0 and "too_few_scored_samples" in m["counts"]["outcome"]["dropped"]
    assert m["counts"]["cache_misses"]["self_instruct"] == 0
    assert not (tmp_path / "checkpoints" / "goodness" / "stage1").exists()


def test_one_resident_releases_each_model_before_the_next_loads(tmp_path):
    """`--one-resident` (the default on CUDA) forced on CPU: the guard loads only after the policy's vLLM engine
    has stopped (its engine-core process gone, its memory back), the engine starts again after the guard is
    released, and training starts with neither loaded; each release is in the run's residency.json."""
    r = subprocess.run(_cmd("--stage", "1", "--one-resident"), cwd=tmp_path, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    run = next((tmp_path / "data" / "runs").iterdir())
    residency = json.loads((run / "residency.json").read_text())
    releases = residency["releases"]
    assert residency["one_resident"] and residency["vllm_engine_starts"] >= 2  # started again after the guard
    turns = [(x["released"], x["for"]) for x in releases]
    assert ("policy", "guard") in turns and ("guard", "policy") in turns and turns[-1][1] == "training", turns
    for x in releases:
        if x["released"] == "policy":  # vLLM's engine-core process exits with its memory
            assert x["processes_after"] < x["processes_before"] and x["rss_after_mb"] < x["rss_before_mb"] - 100, x
    assert (tmp_path / "checkpoints" / "goodness" / "stage1" / "adapter_config.json").is_file()
