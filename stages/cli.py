"""CLI commands of the stages package: `generate` (one stage's data) and `diff` (what an edit regenerates)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(diff)


def generate(
    stage: int = typer.Option(..., "--stage", min=1, max=6, help="stage K (1..6)"),
    persona: str = typer.Option("hhh", "--persona", help="constitution name"),
    profile: str = typer.Option("tiny", "--profile"),
    n_tasks: int = typer.Option(16, "--n-tasks", min=1),
    adapter: str | None = typer.Option(None, "--adapter", help="previous stage's adapter dir (default: base)"),
    engine: str = typer.Option("auto", "--engine", help="vllm | hf | auto"),
    constitution: str | None = typer.Option(None, "--constitution", help="constitution file (default: persona)"),
    out_dir: str = typer.Option("data", "--out"),
    cache: str | None = typer.Option(None, "--cache", help="generation cache (default: <out>/cache.sqlite)"),
    rounds: int = typer.Option(2, "--rounds", min=1),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate stage K's preference data for a persona (cached: reruns pay only for what changed)."""
    import json
    from pathlib import Path

    from rich.console import Console

    from constitution import ConstitutionError, load_constitution
    from engine.base import make_engine
    from engine.cache import GenerationCache
    from stages.run import run_stage

    con = Console(stderr=True)
    try:
        const = load_constitution(constitution or persona)
    except ConstitutionError as e:
        con.print(f"[red]constitution error:[/red] {e}")
        raise typer.Exit(2) from e
    with make_engine(engine, profile) as eng, GenerationCache(Path(cache or Path(out_dir) / "cache.sqlite")) as c:
        with con.status("generating") as status:
            m = run_stage(stage, persona, eng, c, out_dir, n_tasks=n_tasks, adapter=adapter, seed=seed,
                          constitution=const, rounds=rounds, max_tokens=max_tokens,
                          log=lambda msg: (status.update(msg), con.log(msg)))
    typer.echo(json.dumps({k: m[k] for k in ("persona", "stage", "counts", "tokens", "engine_calls",
                                             "wall_seconds")}, indent=2))


def diff(
    persona: str = typer.Option("hhh", "--persona"),
    constitution: str | None = typer.Option(None, "--constitution", help="edited file (default: the one on disk)"),
    out_dir: str = typer.Option("data", "--out"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Before any spend: how many items per stage each changed principle will regenerate, and the tokens."""
    import json

    from rich.console import Console
    from rich.table import Table

    from constitution import ConstitutionError, load_constitution
    from stages.diff import plan

    try:
        p = plan(out_dir, persona, load_constitution(constitution or persona))
    except (ConstitutionError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if as_json:
        typer.echo(json.dumps(p))
        return
    t = Table(title=f"regeneration plan for {persona}")
    for col in ("stage", "principle", "change", "items", "est. tokens"):
        t.add_column(col)
    for stage, s in p["stages"].items():
        for pid, b in s["by_principle"].items():
            t.add_row(stage, pid, p["changes"].get(pid, "moved"), str(b["items"]), str(b["estimated_tokens"]))
    Console().print(t)
    typer.echo(f"{p['items_to_regenerate']} of {p['total_items']} items regenerate, "
               f"about {p['estimated_tokens']} tokens")
