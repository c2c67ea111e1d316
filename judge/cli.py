"""`python bootstrap.py judge INPUT.jsonl --config JUDGE.yaml --out OUT.jsonl [--scorer em|persona] ...`"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("judge")
    def judge(
        input: Path = typer.Argument(
            ..., help="JSONL rows with id, question, answer (+ fields carried through)"
        ),
        config: Path | None = typer.Option(None, "--config", help="judge YAML (default: judge/default.yaml)"),
        out: Path = typer.Option(..., "--out", help="output JSONL (rows appended as they complete)"),
        scorer: str = typer.Option("em", "--scorer", help="em | persona"),
        budget_usd: float | None = typer.Option(None, "--budget-usd", help="hard cap on this run's $"),
        run: str = typer.Option("judge", "--run", help="run id for the cost ledger"),
        purpose: str = typer.Option("em-eval", "--purpose", help="what the calls are for (ledger)"),
        constitution: Path | None = typer.Option(
            None, "--constitution", help="persona scorer: YAML with description and principles"
        ),
        anchors: int = typer.Option(0, "--anchors", help="EM scorer: judge this many known-score anchors"),
        explain_miss: bool = typer.Option(
            False, "--explain-miss", help="send nothing: say per item why it is not cached"
        ),
        no_progress: bool = typer.Option(False, "--no-progress"),
    ) -> None:
        """Judge answers with an LLM judge farm: rate-limited, cached, budgeted, resumable."""
        import asyncio
        import json

        from judge.cache import Cache
        from judge.config import ConfigError, load_config
        from judge.farm import _endpoints, judge_stream
        from judge.ledger import Ledger

        try:
            cfg = load_config(config)
        except ConfigError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2) from None
        sc = _make_scorer(scorer, constitution)
        if not input.is_file():
            typer.echo(f"input {input} does not exist", err=True)
            raise typer.Exit(2)
        rows = list(_read_jsonl(input))
        cache = Cache(cfg.cache_path)
        if explain_miss:
            _explain(rows, sc, cfg, cache)
            return
        if not cfg.usable():
            envs = ", ".join(e.api_key_env for e in cfg.endpoints if e.api_key_env)
            typer.echo(
                f"{config or 'judge/default.yaml'}: no usable endpoint: set {envs} or add a `local: true` "
                "endpoint",
                err=True,
            )
            raise typer.Exit(2)
        ledger = Ledger(cfg.ledger_path)
        from judge.scorers import load_anchors

        anchor_rows = load_anchors(n=anchors) if (anchors and scorer == "em") else None
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:

            def write(r) -> None:
                fh.write(json.dumps(r.row(), ensure_ascii=False) + "\n")
                fh.flush()

            with _endpoints(cfg) as (model, eps):
                summary = asyncio.run(
                    judge_stream(
                        rows,
                        sc,
                        cfg,
                        cache,
                        ledger,
                        budget_usd,
                        run,
                        purpose,
                        write,
                        progress=not no_progress,
                        anchors=anchor_rows,
                        model=model,
                        endpoints=eps,
                    )
                )
        _print_summary(summary)
        if summary.budget_stopped:
            raise typer.Exit(3)


def _make_scorer(name: str, constitution: Path | None):
    import yaml

    from judge.scorers import EMScorer, PersonaScorer

    if name == "em":
        return EMScorer()
    if name == "persona":
        if constitution is None:
            typer.echo("--scorer persona needs --constitution FILE.yaml (description, principles)", err=True)
            raise typer.Exit(2)
        data = yaml.safe_load(constitution.read_text()) or {}
        desc = data.get("persona_description") or data.get("description")
        principles = [p if isinstance(p, str) else p.get("text", "") for p in data.get("principles") or []]
        if not isinstance(desc, str) or not principles:
            typer.echo(
                f"{constitution}: needs `description` (or persona_description) and `principles`", err=True
            )
            raise typer.Exit(2)
        return PersonaScorer(desc, principles)
    typer.echo(f"--scorer must be em or persona, got {name!r}", err=True)
    raise typer.Exit(2)


def _read_jsonl(path: Path):
    import json

    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                typer.echo(f"{path}:{n}: not valid JSON ({e.msg})", err=True)
                raise typer.Exit(2) from None
            if not isinstance(row, dict) or "id" not in row:
                typer.echo(f"{path}:{n}: each row must be a JSON object with an `id`", err=True)
                raise typer.Exit(2)
            yield row


def _explain(rows, sc, cfg, cache) -> None:
    model, usable = cfg.model, cfg.usable()
    if usable and usable[0].local and cfg.local_model:
        from judge.local_server import LocalVLLMServer

        model = LocalVLLMServer(cfg.local_model).served_name  # computed without starting it
    for row in rows:
        for name, req in sc.requests(row).items():
            typer.echo(f"{row['id']} [{name}]: {cache.explain_miss(model, req, sc.template_version)}")


def _print_summary(s) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"judge run {s.run}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in [
        ("items", s.items),
        ("ok", s.ok),
        ("from cache", s.cached_items),
        *[(f"failed: {r}", n) for r, n in sorted(s.failures.items())],
        ("requests sent", s.requests_sent),
        ("429s", s.r429),
        ("retries", s.retries),
        ("$ spent", f"{s.usd:.6f}"),
        ("seconds", s.seconds),
    ]:
        t.add_row(k, str(v))
    if s.budget_stopped or s.remaining:
        t.add_row("budget: items not sent", str(s.remaining))
        t.add_row("budget: their worst-case $", f"{s.remaining_usd:.6f}")
    if s.drift:
        for k, v in s.drift.items():
            t.add_row(f"anchor {k}", str(v))
    Console(stderr=True).print(t)
