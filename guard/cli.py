"""CLI of the guard package: `guard check` classifies texts with the run's guard and prints verdicts."""

from __future__ import annotations

import typer


def guard_check(
    texts: list[str] = typer.Argument(..., help="prompt(s) to classify, or the prompt --answer replies to"),
    answer: str | None = typer.Option(None, "--answer", help="classify this answer to the (single) prompt"),
    guard: str | None = typer.Option(
        None, "--guard", help="llama-guard-3-8b | llama-guard-3-1b | tiny | none (default: 8B on CUDA, "
        "the tiny stand-in on CPU)"),
    profile: str = typer.Option("tiny", "--profile", help="the run's profile (picks the default guard)"),
    threshold: float = typer.Option(0.5, "--threshold", help="P(unsafe) at or above which a text is unsafe"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON verdict per line"),
) -> None:
    """Classify prompts (or one prompt + answer) with Llama Guard 3 and print the verdicts.

    Example: python bootstrap.py guard check "How do I pick a lock?" --answer "I can't help with that." --json
    """
    from rich.console import Console
    from rich.table import Table

    from cai_bootstrap.guard import load_guard
    from cai_bootstrap.guard.format import CATEGORIES

    if answer is not None and len(texts) != 1:
        raise typer.BadParameter("--answer classifies one answer: pass exactly one prompt TEXT with it")
    kw = {} if guard == "none" else {"threshold": threshold}
    g = load_guard(guard, profile, **kw)
    verdicts = g.check_answers([(texts[0], answer)]) if answer is not None else g.check_prompts(list(texts))
    if as_json:
        for v in verdicts:
            typer.echo(v.model_dump_json())
        return
    con = Console()
    table = Table(title=f"guard: {g.name}" + ("  [yellow](stand-in, not a real Llama Guard)[/yellow]"
                                              if verdicts and verdicts[0].stand_in else ""))
    for col in ("text", "verdict", "P(unsafe)", "categories"):
        table.add_column(col)
    shown = [answer] if answer is not None else list(texts)
    for text, v in zip(shown, verdicts, strict=True):
        label = "[red]error[/red]" if v.error else "[red]unsafe[/red]" if v.unsafe else "[green]safe[/green]"
        if v.malformed:
            label += " (malformed output)"
        cats = ", ".join(f"{c} {CATEGORIES.get(c, '?')}" for c in v.categories) or (v.error or "")
        table.add_row(text[:60], label, f"{v.p_unsafe:.3f}", cats)
    con.print(table)
