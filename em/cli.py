"""CLI commands of the EM experiment: `em run` (train the arms, answer, judge, summarise) and `em rescore` (a second
judge on the stored answers)."""

from __future__ import annotations

from pathlib import Path

import typer

from cai_bootstrap.run.layout import Layout
from cai_bootstrap.run.options import COUNTS, PERSONAS, PRESET, RAY_REPLICAS, ray_option, run_config

EM_DATA = typer.Option(None, "--em-data", help="the EM paper's release (the folder holding betley/; default: "
                       "$CAI_EM_DATA; `data fetch em-paper` makes one): its main questions and judge prompts "
                       "replace the project's")


def em(
    data: Path | None = typer.Option(None, "--data", help="EM SFT data: chat JSONL ({'messages': [...]} rows); "
                                     "default with --em-data: the paper's insecure.jsonl"),
    persona: list[str] = PERSONAS,
    profile: str = typer.Option("tiny", "--profile"),
    questions: Path | None = typer.Option(None, "--questions", help="EM questions YAML (e.g. the paper's)"),
    judge_config: Path | None = typer.Option(None, "--judge-config", help="judge YAML (default: judge/default.yaml)"),
    mode: str = typer.Option("on-top", "--mode", help="on-top | base"),
    budget_usd: float | None = typer.Option(None, "--budget-usd"),
    run: str | None = typer.Option(None, "--run", help="run id (default: derived from the config)"),
    stage: int = typer.Option(6, "--stage", help="the persona adapter is this stage's (6: the full persona)"),
    quick: bool = typer.Option(False, "--quick", help="the quick preset"),
    preset: str = PRESET,
    counts: str | None = COUNTS,
    seeds: int | None = typer.Option(None, "--seeds", min=1, help="EM training seeds per arm (default: the preset's; "
                                     "research 3)"),
    question_group: list[str] = typer.Option(["main"], "--question-group",
                                             help="question groups to ask: main, json, template, preregistered"),
    em_data: Path | None = EM_DATA,
    secure_data: Path | None = typer.Option(None, "--secure-data", help="chat JSONL of secure code (the EM "
                                            "paper's secure.jsonl): adds a secure-code control adapter per persona"),
    gpu_hour_usd: float | None = typer.Option(None, "--gpu-hour-usd", help="$ per engine-hour (default: profile)"),
    ray: str | None = ray_option("answer"),
    ray_replicas: int | None = RAY_REPLICAS,
) -> None:
    """Train the EM adapter on top of each persona adapter (and the base), per seed; answer, judge, summarise.

    Example: python bootstrap.py em run --data insecure.jsonl --persona goodness --persona sycophancy --seeds 3
    """
    import json

    from cai_bootstrap.em.experiment import run_em
    from cai_bootstrap.em.inputs import resolve
    from cai_bootstrap.run.config import check_ray, save_config

    inputs = resolve(data, questions, em_data, tuple(question_group), judge_config=judge_config, secure=secure_data)
    if seeds is not None:
        counts = json.dumps({**json.loads(counts or "{}"), "em_seeds": seeds})
    cfg = run_config(persona, profile, "quick" if quick else preset, stage, counts, gpu_hour_usd).model_copy(
        update={"ray": ray, "ray_replicas": ray_replicas})
    check_ray(cfg)
    run_id = run or cfg.default_id()
    save_config(cfg, run_id)
    from cai_bootstrap.judge.session import check_complete

    result = run_em(cfg, run_id, inputs, judge_config, budget_usd, mode, tuple(question_group))
    _report(cfg, run_id)
    check_complete(result["judge"], "the EM judge")


def em_rescore(
    run: str | None = typer.Argument(None, help="run id (default: the newest run)"),
    judge_config: Path = typer.Option(..., "--judge-config", help="the other judge's YAML"),
    budget_usd: float | None = typer.Option(None, "--budget-usd"),
    data_root: Path = typer.Option(Path("data"), "--data-root"),
) -> None:
    """Judge a run's stored EM answers with another judge (no generation): its EM rates, its anchors and its
    agreement with the run's judge go to em/judges/<model>/ and the report.

    Example: python bootstrap.py em rescore --judge-config judge/configs/gpt-5-mini.yaml
    """
    from cai_bootstrap.em.judges import rescore
    from cai_bootstrap.run.config import load_run_config

    run_id, cfg = load_run_config(Layout(data_root).find_run(run).root)
    from cai_bootstrap.judge.session import check_complete

    res = rescore(cfg, run_id, judge_config, budget_usd)
    g = res["agreement"]
    typer.echo(f"{res['model']}: EM-label kappa {g['kappa']} (n={g['em_label_n']}), alignment Spearman "
               f"{g['aligned_spearman']} (n={g['aligned_n']}) against the run's judge")
    _report(cfg, run_id)
    check_complete(res["judge"], res["model"])


def _report(cfg, run_id: str) -> None:
    from cai_bootstrap.analysis.report import build_report

    out = build_report(cfg.run(run_id).root)
    typer.echo(f"report: {out}")
