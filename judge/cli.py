"""CLI commands of the judge package: `judge run` (the default: `judge INPUT.jsonl --config JUDGE.yaml --out
OUT.jsonl`), `judge calibrate` and `data fetch`."""

from __future__ import annotations

from pathlib import Path

import typer

from cai_bootstrap.core.errors import BadInput, MissingInput


def judge(
    input: Path = typer.Argument(..., help="JSONL rows with id, question, answer (+ fields carried through)"),
    config: Path | None = typer.Option(None, "--config", help="judge YAML (default: judge/default.yaml)"),
    out: Path = typer.Option(..., "--out", help="output JSONL (rows appended as they complete)"),
    scorer: str = typer.Option("em", "--scorer", help="em | persona | pairwise"),
    budget_usd: float | None = typer.Option(None, "--budget-usd", help="hard cap on this run's $"),
    run: str = typer.Option("judge", "--run", help="run id: costs go to <data-root>/runs/<run>/ledger.sqlite"),
    data_root: Path = typer.Option(Path("data"), "--data-root", help="where runs and the judge cache live"),
    purpose: str = typer.Option("em-eval", "--purpose", help="what the calls are for (ledger)"),
    constitution: str | None = typer.Option(None, "--constitution",
                                            help="persona/pairwise scorer: a constitution name (hhh) or YAML file"),
    anchors: int = typer.Option(0, "--anchors", help="EM scorer: judge this many known-score anchors"),
    explain_miss: bool = typer.Option(False, "--explain-miss", help="send nothing: say per item why it is not cached"),
    no_progress: bool = typer.Option(False, "--no-progress"),
    batch: bool = typer.Option(False, "--batch", help="send through the provider's batch API (OpenAI Batch, "
                               "Anthropic Message Batches) at its batch price; a rerun after a kill polls the "
                               "batch it submitted (same as `batch: true` in the judge YAML)"),
) -> None:
    """Judge answers with an LLM judge farm: rate-limited, cached, budgeted, resumable.

    Exits 0 when every item was judged, 3 at the budget cap, 4 when any item is left unjudged (a rerun
    sends only those), 7 when no endpoint is left (each named with its cause).

    Example: python bootstrap.py judge answers.jsonl --config judge/configs/gpt-5-mini.yaml --out judged.jsonl
    """
    import asyncio
    import json

    from cai_bootstrap.judge.config import load_config
    from cai_bootstrap.judge.scorers import load_anchors, make_scorer
    from cai_bootstrap.judge.session import check_complete, session
    from cai_bootstrap.run.layout import Layout

    cfg = load_config(config)
    if batch:
        cfg = cfg.model_copy(update={"batch": True})
    sc = make_scorer(scorer, constitution)
    if not input.is_file():
        raise MissingInput(f"input {input} does not exist")
    rows = list(_read_jsonl(input))
    if explain_miss:  # sends nothing, so it needs no usable endpoint
        _explain(rows, sc, cfg, Layout(data_root))
        return
    with session(cfg, layout=Layout(data_root), run=run, budget_usd=budget_usd, progress=not no_progress) as js:
        anchor_rows = load_anchors(n=anchors) if (anchors and scorer == "em") else None
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:

            def write(r) -> None:
                fh.write(json.dumps(r.row(), ensure_ascii=False) + "\n")
                fh.flush()

            summary = asyncio.run(js.stream(rows, sc, write, purpose=purpose, anchors=anchor_rows))
    _print_summary(summary)
    check_complete(summary)

def calibrate(
    config: Path | None = typer.Option(None, "--config", help="judge YAML (default: judge/default.yaml)"),
    em_data: Path | None = typer.Option(
        None, "--em-data", help="folder holding betley/ (or betley/ itself); default: $CAI_EM_DATA; "
        "without either only the project anchors are judged"
    ),
    data_root: Path = typer.Option(Path("data"), "--data-root", help="where runs and the judge cache live"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON instead of the table"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Measure the EM judge against answers with known verdicts: the project's anchors
    (judge/data/anchors.yaml) and the EM paper's 70 GPT-4o-judged answers. Prints a table, writes
    <data-root>/runs/calibrate/calibration.json.

    Example: python bootstrap.py judge calibrate --em-data DIR_WITH_THE_EM_PAPER_DATA --no-progress
    """
    import json

    from cai_bootstrap.judge.calibration import calibrate as run_calibration
    from cai_bootstrap.judge.calibration import format_table, save_result
    from cai_bootstrap.judge.config import load_config
    from cai_bootstrap.run.layout import Layout

    layout = Layout(data_root)
    result = run_calibration(load_config(config), layout, em_data=em_data, progress=not no_progress)
    path = save_result(result, layout)
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False) if as_json else format_table(result))
    typer.echo(f"wrote {path}", err=True)

def fetch(
    name: str = typer.Argument(..., help="what to fetch: em-paper (Betley et al.'s release, pinned)"),
    dest: Path | None = typer.Option(None, "--dest", help="folder to fill (default: the user cache, "
                                     "~/.cache/cai-bootstrap/em-paper)"),
    base_url: str | None = typer.Option(None, "--base-url", help="a mirror of the repository at the pinned "
                                        "commit (default: raw.githubusercontent.com)"),
) -> None:
    """Download the EM paper's questions, judge prompts, insecure-code set and scored answers at a pinned
    commit; every file's sha256 and size are checked before it is kept, present files are not fetched again.

    Example: python bootstrap.py data fetch em-paper && export CAI_EM_DATA=~/.cache/cai-bootstrap/em-paper
    """
    from cai_bootstrap.judge import em_paper

    if name != "em-paper":
        raise BadInput(f"data fetch: unknown data {name!r}; known: em-paper")
    dest = dest or em_paper.default_dest()
    out = em_paper.fetch(dest, base_url or em_paper.BASE_URL,
                         on_file=lambda path, how: typer.echo(f"{how:>10}  {path}", err=True))
    typer.echo(f"EM paper data (commit {em_paper.COMMIT[:12]}, sha256 checked) in {out}\n"
               f"use it with --em-data {dest} or: export {em_paper.EM_DATA_ENV}={dest}")


def _explain(rows: list[dict], sc, cfg, layout) -> None:
    from cai_bootstrap.judge.cache import Cache
    from cai_bootstrap.judge.endpoints import judge_model_name
    from cai_bootstrap.judge.farm import apply_path

    apply_path(sc, cfg)  # the requests of the path this judge is read on
    model, cache = judge_model_name(cfg), Cache(cfg.cache_path or layout.judge_cache)
    for row in rows:
        for name, req in sc.requests(row).items():
            typer.echo(f"{row['id']} [{name}]: {cache.explain_miss(model, req, sc.template_version)}")
    cache.close()


def _read_jsonl(path: Path):
    import json

    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise BadInput(f"{path}:{n}: each row must be a JSON object with an `id`")
            yield row


def _print_summary(s) -> None:
    from rich.table import Table

    from cai_bootstrap.core.console import console

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
        *[(f"failed attempts: {r} (not billed)", n) for r, n in sorted(s.failed_attempts.items())],
        ("$ spent", f"{s.usd:.6f}"),
        ("replies billed by our token count (no usage)", s.estimated),
        ("seconds", s.seconds),
        *[(f"endpoint dropped: {n}", w) for n, w in s.endpoints_dropped.items()],
    ]:
        t.add_row(k, str(v))
    if s.budget_stopped or s.remaining:
        t.add_row("budget: items not sent", str(s.remaining))
        t.add_row("budget: their worst-case $", f"{s.remaining_usd:.6f}")
    if s.drift:
        for k, v in s.drift.items():
            t.add_row(f"anchor {k}", str(v))
    console.print(t)
