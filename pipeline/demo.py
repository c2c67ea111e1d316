"""The demo: every phase of a research run, on the tiny model with small counts, in one command.

Phases, in order: the bootstrap (stages 1..6 per persona), the EM experiment (an EM adapter per persona and on
the base, answered and judged, with the judge's anchors), and, unless `quick`, the per-stage evaluation of each
persona, the steering analysis (vectors, transfer, identity diagnostic) and the activation decomposition. The
report is built by the same code, from the same files, with the same thresholds as a research run; only the
counts differ (the `demo` and `quick` presets, and the analysis sizes below).

Everything it reads ships with the repository: the EM training set is generated (em/insecure_data.py)
and the EM questions, rubrics and anchors are the project's, unless `em_data` names the EM paper's release.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from cai_bootstrap.core.console import console
from cai_bootstrap.core.io import atomic_write_json

PERSONAS = ["goodness", "sycophancy"]  # the two pre-registered hypotheses (H2, H1)
QUICK_PERSONAS = ["goodness"]
# per-stage evaluation: a few prompts per stage (every stage 0-6), few multiple-choice items, short answers
EVAL_SIZES = {"n_general": 2, "n_kind": 1, "n_safety": 2, "mc_limit": 5, "max_tokens": 48}
STEER_SIZES = {"layers": [9, 18], "alphas": [4.0], "n_questions": 4, "samples": 1, "max_new_tokens": 32}
DECOMPOSE_SIZES = {"layers": [9, 18], "per_dimension": 4}


def run_demo(quick: bool = False, personas: list[str] | None = None, em_data: Path | None = None,
             counts_json: str | None = None, judge_config: Path | None = None) -> dict:
    """Run every phase; returns {"run": id, "report": path, "phases": {name: seconds}, "usd": total}.
    `counts_json` overrides keys of the preset's counts; `judge_config` replaces the embedded judge."""
    from cai_bootstrap.em.inputs import resolve
    from cai_bootstrap.engine.vllm_engine import VLLMEngine
    from cai_bootstrap.judge.local_server import LocalVLLMServer

    inputs = resolve(em_data=em_data, generated=True)  # before the first stage: a bad input stops it now
    personas = personas or (QUICK_PERSONAS if quick else PERSONAS)
    preset = "quick" if quick else "demo"
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    starts0 = VLLMEngine.starts, LocalVLLMServer.starts
    starts: dict[str, int] = {}
    record: dict = {"quick": quick, "personas": personas, "cpus": os.cpu_count(), "started": time.time(),
                    "phases_s": phases, "starts": starts}
    root: list[Path] = []  # the run dir, once the bootstrap has named it

    def phase(name: str, fn, *a, **kw):
        start = time.perf_counter()
        console.rule(f"[bold]{name}")
        out = fn(*a, **kw)
        phases[name] = round(time.perf_counter() - start, 1)
        starts.update(vllm_engine=VLLMEngine.starts - starts0[0], judge_server=LocalVLLMServer.starts - starts0[1])
        if root:  # each phase's wall time, kept in the run as it goes (the README's demo figures come from it)
            atomic_write_json(root[0] / "demo.json", record)
        return out

    from cai_bootstrap.em.experiment import run_em
    from cai_bootstrap.em.insecure_data import write_jsonl
    from cai_bootstrap.judge.session import session
    from cai_bootstrap.pipeline.loop import Engines, run_bootstrap
    from cai_bootstrap.run.config import RunConfig, counts_from

    cfg = RunConfig(personas=personas, profile="tiny", stage=6, counts=counts_from(preset, counts_json))
    # one generation engine and one judge server for every phase: each start costs 20-30 s on 2 cores
    with contextlib.ExitStack() as stack:
        engines = Engines(cfg)
        stack.callback(engines.close)
        run_id = phase("bootstrap", run_bootstrap, stage=6, personas=personas, profile="tiny", preset=preset,
                       counts_json=counts_json, engines=engines)
        root.append(cfg.run(run_id).root)
        atomic_write_json(root[0] / "demo.json", record)  # the bootstrap's time, before the run dir was known
        judge = stack.enter_context(session(judge_config, layout=cfg.layout, run=run_id))
        inputs.data = write_jsonl(cfg.layout.em_demo_data, n=max(cfg.counts.em_rows, 40))
        em = phase("em", run_em, cfg, run_id, inputs, engine=engines.get(), judge_session=judge,
                   make_room=engines.make_room)
        if not quick:
            _analyses(cfg, run_id, personas, engines, judge, phase)
    from cai_bootstrap.analysis.report import build_report
    from cai_bootstrap.core.ledger import Ledger

    report = build_report(cfg.run(run_id).root)
    ledger = Ledger(cfg.run(run_id).ledger)
    usd = ledger.total_usd(run_id)
    ledger.close()
    phases["total"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(root[0] / "demo.json", record)
    return {"run": run_id, "report": report, "phases": phases, "usd": usd, "judge": em["judge"], "starts": starts}


def _analyses(cfg, run_id: str, personas: list[str], engines, judge, phase) -> None:
    """The full demo's phases after EM: each persona's per-stage evaluation, steering, decomposition."""
    from cai_bootstrap.analysis.decompose import QUESTIONS_DIR
    from cai_bootstrap.analysis.decompose_run import run_decompose
    from cai_bootstrap.analysis.steer_run import run_steer
    from cai_bootstrap.evals.run import EvalOptions, evaluate

    opts = EvalOptions(stages=list(range(7)), **EVAL_SIZES)
    for p in personas:
        phase(f"eval {p}", evaluate, p, run_id, cfg, opts, engine=engines.get(), guard=engines.get_guard(),
              judge_session=judge, log=lambda _: None)
    root, s = cfg.run(run_id).root, STEER_SIZES
    engines.make_room("steering and decomposition")  # they load the model with transformers
    phase("steer", run_steer, root, s["layers"], s["alphas"], s["n_questions"], s["samples"], s["max_new_tokens"],
          judge_session=judge)
    phase("decompose", run_decompose, root, DECOMPOSE_SIZES["layers"], QUESTIONS_DIR, DECOMPOSE_SIZES["per_dimension"])
