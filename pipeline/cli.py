"""CLI commands of the end-to-end run: `estimate`, `cost`, `report`, `demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from cai_bootstrap.em.cli import EM_DATA
from cai_bootstrap.run.layout import DATA_ROOT, Layout
from cai_bootstrap.run.options import COUNTS, PERSONAS, PRESET, run_config


def estimate(
    persona: list[str] = PERSONAS,
    profile: str = typer.Option("tiny", "--profile"),
    stage: int = typer.Option(6, "--stage"),
    quick: bool = typer.Option(False, "--quick", help="the quick preset"),
    preset: str = PRESET,
    counts: str | None = COUNTS,
    judge_config: list[Path] = typer.Option(None, "--judge-config", help="judge YAML(s) to price the EM judging "
                                            "with (default: judge/default.yaml); one row per judge"),
    questions: Path | None = typer.Option(None, "--questions", help="EM questions YAML (default: the project's)"),
    em_rows: int = typer.Option(6000, "--em-rows", help="rows of EM training data (the paper's set: 6000)"),
    secure_control: bool = typer.Option(False, "--secure-control", help="price a secure-code control adapter per "
                                        "persona too (em --secure-data)"),
    batch: bool = typer.Option(False, "--batch", help="price each judge in batch mode too (its batch API, at the "
                               "endpoint's batch_price)"),
    gpu_hour_usd: float | None = typer.Option(None, "--gpu-hour-usd", help="$ per engine-hour (default: profile)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (with total_usd) instead of tables"),
    data_root: Path = typer.Option(DATA_ROOT, "--data-root", help="whose runs' ledgers give measured throughput for "
                                   "the profile"),
) -> None:
    """The stage plan (pairs aimed for, answer length, DPO epochs and steps), the DPO and EM recipes with where
    each hyper-parameter comes from, and the expected tokens, engine hours and $ per stage, persona and phase,
    and for the EM experiment (training, answering, judging per judge), before anything runs. Throughput measured
    on the same profile (the ledgers of runs under --data-root; bench/gpu_smoke.py --profile P) replaces the
    profile's assumed figures; the figures table says which is which.

    Example: python bootstrap.py estimate --profile qwen2.5-7b --persona goodness --persona sycophancy
    --persona misalignment --stage 6 --json
    """
    import json

    from cai_bootstrap.em.questions import load_questions
    from cai_bootstrap.judge.config import load_config
    from cai_bootstrap.pipeline.estimate import estimate_report

    cfg = run_config(persona, profile, "quick" if quick else preset, stage, counts, gpu_hour_usd).model_copy(
        update={"data_root": str(data_root)})
    judges = [load_config(j) for j in (judge_config or [None])]
    judges += [j.model_copy(update={"batch": True}) for j in judges if batch and not j.batch]
    rep = estimate_report(cfg, list(range(1, stage + 1)), judges, len(load_questions(questions)), em_rows,
                          secure_control)
    if as_json:
        typer.echo(json.dumps(rep, indent=1))
    else:
        _print_estimate(rep)


def _print_estimate(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    plan = Table(title=f"stage plan per persona: profile {rep['profile']}")
    for col in ("recipe", "stage", "name", "tasks", "answers/task", "pairs aimed", "min pairs", "answer tokens",
                "epochs", "steps"):
        plan.add_column(col)
    for sp in rep["stages"]:
        plan.add_row(sp["recipe"], str(sp["stage"]), sp["name"], f"{sp['tasks']:,}", str(sp["answers_per_task"]),
                     f"{sp['pairs_aimed']:,}", str(sp["min_pairs"]), f"{sp['answer_tokens']:,}",
                     "-" if sp["dpo_epochs"] is None else f"{sp['dpo_epochs']:g}", str(sp["dpo_steps"]))
    con.print(plan)
    for kind, rows in rep["recipes"].items():
        t = Table(title=f"{kind.upper()} recipe")
        for col in ("hyper-parameter", "value", "source"):
            t.add_column(col)
        for r in rows:
            value = ", ".join(r["value"]) if isinstance(r["value"], list) else str(r["value"])
            t.add_row(r["name"], value, r["source"])
        con.print(t)
    t = Table(title="figures the estimate rests on")
    for col in ("figure", "value", "measured", "source"):
        t.add_column(col)
    for k, v in rep["figures"].items():
        t.add_row(k, str(v["value"]), "yes" if v["measured"] else "no", v["source"])
    con.print(t)
    t = Table(title=f"estimate: profile {rep['profile']}, {len(rep['personas'])} persona(s)")
    for col in ("persona", "stage", "phase", "tokens in", "tokens out", "engine hours", "$"):
        t.add_column(col, justify="right" if col not in ("persona", "phase") else "left")
    for e in rep["rows"]:
        t.add_row(e["persona"], str(e["stage"]), e["phase"], f"{e['tokens_in']:,}", f"{e['tokens_out']:,}",
                  f"{e['seconds'] / 3600:.3f}", f"{e['usd']:.2f}")
    engine = [e for e in rep["rows"] if not e["phase"].startswith("judge")]
    for phase, usd in rep["totals_usd"].items():  # one total per judge: a run uses one of them
        run = engine + [e for e in rep["rows"] if e["phase"] == phase]
        t.add_row(f"total, {phase}", "", "", f"{sum(e['tokens_in'] for e in run):,}",
                  f"{sum(e['tokens_out'] for e in run):,}", f"{sum(e['seconds'] for e in run) / 3600:.3f}",
                  f"{usd:.2f}")
    con.print(t)


def cost(run: str | None = typer.Argument(None, help="run id (default: the newest run)"),
         data_root: Path = typer.Option(Path("data"), "--data-root")) -> None:
    """The ledger of a run per stage, persona and phase, estimated vs actual.

    Example: python bootstrap.py cost  (the newest run; or `cost RUN_ID`)
    """
    from rich.console import Console
    from rich.table import Table

    from cai_bootstrap.analysis.report import cost_rows
    from cai_bootstrap.pipeline.estimate import estimate_run
    from cai_bootstrap.run.config import load_run_config

    run_path = Layout(data_root).find_run(run).root
    run_id, cfg = load_run_config(run_path)
    est = {(e.persona, e.stage, e.phase): e for e in estimate_run(cfg, list(range(1, cfg.stage + 1)))}
    t = Table(title=f"cost of run {run_id}")
    for col in ("persona", "stage", "phase", "kind", "seconds", "est. seconds", "tokens out", "est. tokens out",
                "$", "est. $"):
        t.add_column(col)
    total = 0.0
    for r in cost_rows(run_path, run_id):
        e = est.get((r["persona"], r["stage"], r["phase"]))
        total += r["usd"] or 0
        stage = "-" if r["stage"] is None else str(r["stage"])
        t.add_row(str(r["persona"] or "-"), stage, r["phase"] or "-", r["kind"],
                  f"{r['seconds'] or 0:.1f}",
                  f"{e.seconds:.1f}" if e else "-", str(r["tokens_out"] or 0), str(e.tokens_out) if e else "-",
                  f"{r['usd'] or 0:.4f}", f"{e.usd:.4f}" if e else "-")
    Console().print(t)
    Console().print(f"total ${total:.4f}")


def report(run: str | None = typer.Argument(None, help="run id (default: the newest run)"),
           data_root: Path = typer.Option(Path("data"), "--data-root")) -> None:
    """Rebuild data/runs/<id>/report.md from stored results (no model or API call).

    Example: python bootstrap.py report  (the newest run; or `report RUN_ID`)
    """
    from cai_bootstrap.analysis.report import build_report

    out = build_report(Layout(data_root).find_run(run).root)
    typer.echo(str(out))


def demo(quick: bool = typer.Option(False, "--quick", help="one persona; stages, EM and cost only"),
         persona: list[str] = typer.Option(None, "--persona"), em_data: Path | None = EM_DATA,
         counts_json: str | None = COUNTS,
         judge_config: Path | None = typer.Option(None, "--judge-config", help="a judge YAML instead of the "
                                                  "embedded one (judge/default.yaml)")) -> None:
    """The whole product on the tiny model: bootstrap stages 1..6, the EM experiment, the per-stage evaluation,
    steering and decomposition, the report. Needs nothing outside the repository.

    Example: python bootstrap.py demo --quick
    """
    from cai_bootstrap.judge.session import check_complete
    from cai_bootstrap.pipeline.demo import run_demo

    res = run_demo(quick, persona or None, em_data, counts_json, judge_config)
    phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in res["phases"].items() if k != "total")
    typer.echo(f"demo run {res['run']} done in {res['phases']['total'] / 60:.1f} min ({phases}), "
               f"${res['usd']:.4f}; {res['starts']['vllm_engine']} vLLM engine and "
               f"{res['starts']['judge_server']} judge server started\nreport: {res['report']}")
    check_complete(res["judge"], "the EM judge")
