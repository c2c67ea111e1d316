"""CLI commands of the inside-the-model analyses: `em steer` and `em decompose` (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path

import typer


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--layers: expected comma-separated integers, got {text!r}") from None


def _run_path(data_root: Path, run: str) -> Path:
    from cai_bootstrap.run.layout import Layout

    return Layout(data_root).find_run(run).root


def steer(
    run: str = typer.Option(..., "--run", help="run id (data/runs/<id>, with em/judged.jsonl)"),
    data_root: Path = typer.Option(Path("data"), "--data-root"),
    layers: str | None = typer.Option(None, "--layers", help="layers to sweep, e.g. 5,11,17 (default: every 3rd)"),
    alphas: str = typer.Option("2,4", "--alphas", help="steering scales (1 = the mean misaligned-aligned gap)"),
    questions: int = typer.Option(8, "--questions", help="EM questions per transfer cell"),
    samples: int = typer.Option(1, "--samples", help="answers per question per cell"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature"),
    judge_config: Path | None = typer.Option(None, "--judge-config", help="judge YAML (default: judge's)"),
    budget_usd: float | None = typer.Option(None, "--budget-usd"),
) -> None:
    """EM steering vectors per arm, transfer matrix (H4), ablation and the identity-level diagnostic.

    Example: python bootstrap.py em steer --run RUN_ID --layers 5,11 --alphas 2,4
    """
    from cai_bootstrap.analysis.steer_run import run_steer
    from cai_bootstrap.run.layout import RunPaths

    try:
        al = [float(x) for x in alphas.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--alphas: expected comma-separated numbers, got {alphas!r}") from None
    res = run_steer(_run_path(data_root, run), _layers(layers), al, questions, samples, max_new_tokens,
                    temperature, judge_config, budget_usd)
    vecs = ", ".join(f"{n}@L{v['layer']}" for n, v in res["vectors"].items()) or "none"
    flagged = [r["model"] for r in res["identity"] if r["flagged"]]
    typer.echo(f"vectors: {vecs}; flagged: {flagged}; "
               f"section: {RunPaths(_run_path(data_root, run)).report_sections / 'steering.md'}")

def decompose(
    run: str = typer.Option(..., "--run", help="run id (data/runs/<id>)"),
    data_root: Path = typer.Option(Path("data"), "--data-root"),
    layers: str | None = typer.Option(None, "--layers", help="e.g. 5,11,17 (default: every 3rd)"),
    per_dimension: int | None = typer.Option(None, "--per-dimension", help="first N questions per dimension"),
    questions_dir: Path | None = typer.Option(None, "--questions-dir", help="folder of dimension YAML files"),
) -> None:
    """PCA + k-means of base vs EM models' activations over four question dimensions, per layer.

    Example: python bootstrap.py em decompose --run RUN_ID --per-dimension 8
    """
    from cai_bootstrap.analysis.decompose import QUESTIONS_DIR
    from cai_bootstrap.analysis.decompose_run import run_decompose

    res = run_decompose(_run_path(data_root, run), _layers(layers), questions_dir or QUESTIONS_DIR, per_dimension)
    for r in res["table"]:
        pc1 = r.get("shift_pc1_share", float("nan"))
        typer.echo(f"layer {r['layer']}: k={r['k']} silhouette={r['silhouette']:.2f} "
                   f"ARI(dimension)={r['ari_dimension']:.2f} shift PC1={pc1:.2f}")
