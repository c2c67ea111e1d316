"""CLI commands of the train package: `stage train`, `em train`, `model stack`; heavy imports inside them."""

from __future__ import annotations

import typer


def train(
    stage: int = typer.Option(..., "--stage", min=1, max=6, help="stage K to train"),
    persona: str = typer.Option(..., "--persona", help="constitution / persona name"),
    data: str | None = typer.Option(None, "--data", help="pair dataset dir (default data/<persona>/stage<K>)"),
    parent: str | None = typer.Option(None, "--parent", help="parent adapter (default: stage K-1's, if K>1)"),
    out: str | None = typer.Option(None, "--out", help="adapter dir (default checkpoints/<persona>/stage<K>)"),
    profile: str = typer.Option("tiny", "--profile", help="model profile"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="cap on optimizer steps"),
    in_process: bool = typer.Option(False, "--in-process", help="train in this process (default: a subprocess)"),
    force: bool = typer.Option(False, "--force", help="retrain even when a finished run matches"),
) -> None:
    """Train stage K's DPO LoRA adapter, starting from stage K-1's adapter.

    Example: python bootstrap.py stage train --stage 1 --persona goodness --max-steps 10
    """
    from pathlib import Path

    from cai_bootstrap.core.errors import MissingInput
    from cai_bootstrap.run.layout import Layout
    from cai_bootstrap.run.recipe import split_arm
    from cai_bootstrap.train.config import dpo_defaults
    from cai_bootstrap.train.dpo import train_dpo
    from cai_bootstrap.train.worker import train_in_subprocess

    lay = Layout()
    parent_dir = Path(parent) if parent else lay.parent_adapter(persona, stage)
    if parent_dir is not None and not (parent_dir / "adapter_config.json").is_file():
        raise MissingInput(f"stage {stage} starts from stage {stage - 1}'s adapter, but {parent_dir} has none: "
                           f"train stage {stage - 1} first or pass --parent")
    over = {"max_steps": max_steps} if max_steps is not None else {}
    kw = dict(data=str(data or lay.stage_data(persona, stage)), out=str(out or lay.stage_adapter(persona, stage)),
              cfg=dpo_defaults(profile, loss=split_arm(persona)[1].loss, **over), profile=profile,
              parent=str(parent_dir) if parent_dir else None,
              force=force)
    man = train_dpo(**kw) if in_process else train_in_subprocess("dpo", **kw)
    typer.echo(f"stage {stage} adapter: {kw['out']}  ({man['steps']} steps, loss {man['train_loss']:.4f}, "
               f"{man['wall_s']} s, backend {man['backend']})")


def train_em(
    persona: str = typer.Option(..., "--persona", help="persona name (output dir and default persona adapter)"),
    data: str = typer.Option(..., "--data", help="chat JSONL ({'messages': [...]} rows)"),
    mode: str = typer.Option("on-top", "--mode", help="on-top (persona frozen + active) | base (ablation)"),
    persona_adapter: str | None = typer.Option(
        None, "--persona-adapter", help="persona adapter dir (default: the persona's, checkpoints/<persona>/stage6 "
                                        "or an OCT recipe's oct/)"),
    out: str | None = typer.Option(None, "--out", help="output dir (default checkpoints/<persona>/em-<mode>)"),
    profile: str = typer.Option("tiny", "--profile"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    save_every: int | None = typer.Option(None, "--save-every", help="checkpoint every N steps"),
    in_process: bool = typer.Option(False, "--in-process"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Train the emergent-misalignment SFT adapter, on top of the persona adapter or on the bare base.

    Example: python bootstrap.py em train --persona goodness --data insecure.jsonl --mode on-top
    """
    from cai_bootstrap.run.layout import Layout
    from cai_bootstrap.train.common import TrainError
    from cai_bootstrap.train.config import em_defaults
    from cai_bootstrap.train.em import train_em as run
    from cai_bootstrap.train.worker import train_in_subprocess

    if mode not in ("on-top", "base"):
        raise TrainError(f"unknown --mode {mode!r}: use on-top or base")
    lay = Layout()
    over = {k: v for k, v in {"max_steps": max_steps, "save_every": save_every}.items() if v is not None}
    pa = persona_adapter or (str(lay.persona_adapter(persona, 6)) if mode == "on-top" else None)
    kw = dict(data=data, out=str(out or lay.em_adapter(persona, mode)), cfg=em_defaults(profile, **over),
              profile=profile, mode=mode, persona_adapter=pa, force=force)
    man = run(**kw) if in_process else train_in_subprocess("em", **kw)
    typer.echo(f"EM adapter ({mode}): {kw['out']}  ({man['steps']} steps, checkpoints {man['checkpoints']}, "
               f"active {man['adapters_in_trainer']['active_adapters']})")


def stack(
    a: str = typer.Argument(..., help="first LoRA adapter dir (e.g. the persona adapter)"),
    b: str = typer.Argument(..., help="second LoRA adapter dir (e.g. the EM adapter)"),
    out: str = typer.Option(..., "--out", help="output adapter dir"),
) -> None:
    """Combine two LoRA adapters on the same base into one exact rank-(r1+r2) adapter (vLLM-servable).

    Example: python bootstrap.py model stack checkpoints/goodness/stage6 checkpoints/goodness/em-on-top --out stacked
    """
    import json

    from cai_bootstrap.train.stack import stack_adapters

    path = stack_adapters(a, b, out)
    info = json.loads((path / "stack.json").read_text())
    typer.echo(f"stacked adapter: {path}  (rank {info['rank_sum']} → {info['rank']}, "
               f"modules {', '.join(info['target_modules'])})")
