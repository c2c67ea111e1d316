"""CLI commands of the stages package: `stage generate` (one stage's data), `stage diff` (what an edit regenerates)."""

from __future__ import annotations

import typer

from cai_bootstrap.core.console import console


def generate(
    stage: int = typer.Option(..., "--stage", min=1, max=6, help="stage K (1..6)"),
    persona: str = typer.Option("hhh", "--persona", help="constitution name"),
    profile: str = typer.Option("tiny", "--profile"),
    # count defaults are the profile's research preset (run.config), read inside the command so `--help` imports
    # only typer
    n_tasks: int | None = typer.Option(None, "--n-tasks", min=1,
                                       help="tasks (default: the profile's research preset)"),
    adapter: str | None = typer.Option(None, "--adapter", help="previous stage's adapter dir (default: base)"),
    engine: str = typer.Option("auto", "--engine", help="vllm | hf | auto"),
    constitution: str | None = typer.Option(None, "--constitution", help="constitution file (default: persona)"),
    out_dir: str = typer.Option("data", "--out"),
    cache: str | None = typer.Option(None, "--cache",
                                     help="generation cache (default: <out>/cache/generations.sqlite)"),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="critique rounds (default: the research preset's)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="answer tokens (default: the research preset's)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate stage K's preference data for a persona (cached: reruns pay only for what changed).

    Example: python bootstrap.py stage generate --stage 1 --persona goodness --n-tasks 8
    """
    import json
    from pathlib import Path

    from cai_bootstrap.constitution import load_constitution
    from cai_bootstrap.engine.cache import GenerationCache
    from cai_bootstrap.engine.factory import make_engine
    from cai_bootstrap.run.config import preset_counts
    from cai_bootstrap.run.layout import Layout
    from cai_bootstrap.run.recipe import persona_of
    from cai_bootstrap.stages.run import StageJob, run_stage

    counts = preset_counts("research", profile)
    n_tasks = counts.n_tasks if n_tasks is None else n_tasks
    rounds = counts.rounds if rounds is None else rounds
    max_tokens = counts.max_tokens if max_tokens is None else max_tokens
    con = console
    const = load_constitution(constitution or persona_of(persona))  # a bad file is ConstitutionError (BadInput, exit 2)
    cache_path = Path(cache) if cache else Layout(data_root=out_dir).generation_cache
    with make_engine(engine, profile) as eng, GenerationCache(cache_path) as c:
        with con.status("generating") as status:
            job = StageJob(stage=stage, persona=persona, out_dir=out_dir, n_tasks=n_tasks, adapter=adapter,
                           seed=seed, constitution=const, rounds=rounds, max_tokens=max_tokens,
                           n_samples=counts.n_samples, red_team_share=counts.red_team_share)
            m = run_stage(job, eng, c, log=lambda msg: (status.update(msg), con.log(msg)))
    typer.echo(json.dumps({k: m[k] for k in ("persona", "stage", "counts", "goal", "tokens", "engine_calls",
                                             "wall_seconds")}, indent=2))


def diff(
    persona: str = typer.Option("hhh", "--persona"),
    constitution: str | None = typer.Option(None, "--constitution", help="edited file (default: the one on disk)"),
    out_dir: str = typer.Option("data", "--out"),
    ckpt_dir: str = typer.Option("checkpoints", "--checkpoints", help="where the stage adapters are (training time)"),
    profile: str = typer.Option("tiny", "--profile", help="model profile whose price the dollars use"),
    gpu_hour_usd: float | None = typer.Option(None, "--gpu-hour-usd", help="$ per engine-hour (default: profile)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Before any spend: per stage, the items an edited constitution regenerates (by principle, and every item of
    the stages after the first one it reaches, whose parent adapter changes), the tokens and the dollars.

    Example: python bootstrap.py stage diff --persona goodness --constitution my-goodness.yaml --json
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from cai_bootstrap.constitution import load_constitution
    from cai_bootstrap.run.config import RunConfig
    from cai_bootstrap.run.recipe import persona_of
    from cai_bootstrap.stages.diff import plan

    rate = RunConfig(profile=profile, gpu_hour_usd=gpu_hour_usd).usd_per_engine_second
    # a bad constitution is ConstitutionError (BadInput, exit 2); no stored data is MissingInput (exit 5)
    p = plan(out_dir, persona, load_constitution(constitution or persona_of(persona)), ckpt_dir, rate)
    if as_json:
        typer.echo(json.dumps(p))
        return
    t = Table(title=f"regeneration plan for {persona}")
    for col in ("stage", "principle", "change", "items", "est. tokens", "est. $ (stage)"):
        t.add_column(col)
    for stage, s in p["stages"].items():
        for pid, b in s["by_principle"].items():
            t.add_row(stage, pid, p["changes"].get(pid, "moved"), f"{b['items']} of {s['items']}",
                      str(b["estimated_tokens"]), f"{s['estimated_usd']:.4f}")
    Console().print(t)
    reached = p["first_stage_reached"]
    typer.echo(f"{p['items_to_regenerate']} of {p['total_items']} items regenerate, about {p['estimated_tokens']} "
               f"tokens and ${p['estimated_usd']:.4f}" + (
                   f"; stage {reached} is the first the edit reaches, so every later stage regenerates (an upper "
                   "bound: a stage whose pairs come out unchanged keeps its adapter)" if reached else ""))
