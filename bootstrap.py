#!/usr/bin/env python
"""cai-bootstrap CLI. `python bootstrap.py --stage 6` runs the bootstrap; subcommands run single phases.

Each package contributes its commands through `<package>/cli.py: register(app)`; those modules import typer and
the light config modules (run.options) at top level so `--help` stays fast, and load engines inside the commands.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click
import typer
from typer.core import TyperGroup

from core.console import console, log_path, quiet
from core.errors import CaiError
from run.options import RAY_REPLICAS, ray_option

# commands whose libraries talk: their output goes to a log file (the run's run.log once the run is known),
# when this file runs as the program (not when a test invokes `app` in its own process)
STANDALONE = False
QUIET = {None, "demo", "em", "em-rescore", "eval", "steer", "decompose", "calibrate", "judge", "generate", "train",
         "train-em", "generate-text", "guard-check"}


class ExitCodes(TyperGroup):
    """Every command's expected errors (`core.errors.CaiError`) end as one red line and the class's exit
    code (the table in the README), never a traceback; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CaiError as e:
            console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
            _log_hint()
            raise typer.Exit(e.exit_code) from None
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception:
            if log_path() is None:  # not quiet: Python prints the traceback itself
                raise
            # descriptor 2 is the log: the traceback of a bug goes to the console too
            import traceback

            console.print(traceback.format_exc(), style="red", markup=False, highlight=False, soft_wrap=True)
            _log_hint()
            raise typer.Exit(1) from None


def _log_hint() -> None:
    if (path := log_path()) is not None:
        console.print(f"the libraries' output is in {path}", style="dim", markup=False, highlight=False, soft_wrap=True)


app = typer.Typer(
    cls=ExitCodes,
    help="Self-bootstrapping Constitutional AI pipeline and emergent-misalignment experiment.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

COMMAND_MODULES = [
    "engine.cli", "stages.cli", "guard.cli", "train.cli", "judge.cli", "analysis.cli", "evals.cli", "em.cli",
    "pipeline.cli",
]
for _name in COMMAND_MODULES:
    if importlib.util.find_spec(_name.split(".")[0]) and importlib.util.find_spec(_name):
        importlib.import_module(_name).register(app)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    stage: int | None = typer.Option(None, "--stage", min=1, max=6, help="run stages 1..K"),
    only: int | None = typer.Option(None, "--only", min=1, max=6, help="run just stage K"),
    persona: list[str] = typer.Option(["hhh"], "--persona", help="constitution name(s), each optionally with its "
                                      "recipe: goodness@oct-dpo, goodness@bootstrap-orpo (default bootstrap-dpo)"),
    pairs: str | None = typer.Option(None, "--pairs", help="pair source for personas without a recipe: bootstrap "
                                     "(the six stages) | oct (OpenCharacterTraining's distillation)"),
    loss: str | None = typer.Option(None, "--loss", help="preference loss for personas without a recipe: dpo | orpo"),
    introspect: bool = typer.Option(False, "--introspect", help="add OCT's introspection after the preference "
                                    "training (an SFT adapter stacked on top): goodness@oct-dpo+introspect"),
    teacher: str | None = typer.Option(None, "--teacher", help="OCT's teacher profile (default: the policy itself)"),
    profile: str = typer.Option("tiny", "--profile", help="model profile"),
    budget_usd: float | None = typer.Option(None, "--budget-usd", help="hard cap on the run's $"),
    run_id: str | None = typer.Option(None, "--run", help="run id (default: derived from the config)"),
    quick: bool = typer.Option(False, "--quick", help="the quick preset (smallest counts)"),
    preset: str = typer.Option("research", "--preset", help="counts preset: research | demo | quick"),
    counts: str | None = typer.Option(None, "--counts",
                                      help='JSON overrides of the preset\'s counts, e.g. \'{"n_tasks": 4}\''),
    gpu_hour_usd: float | None = typer.Option(None, "--gpu-hour-usd", help="$ per engine-hour (default: profile)"),
    engine: str = typer.Option("auto", "--engine", help="vllm | hf | auto"),
    guard_policy: str | None = typer.Option(None, "--guard-policy", help="guard policy YAML: blocked Llama Guard "
                                            "categories, threshold, drop or quarantine (default: guard/policy.yaml)"),
    one_resident: bool = typer.Option(False, "--one-resident", help="one large model in memory at a time, as on a "
                                      "GPU (engines and guard released in turn; the default on CUDA)"),
    ray: str | None = ray_option("generate"),
    ray_replicas: int | None = RAY_REPLICAS,
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar="CAI_VERBOSE",
                                 help="show the libraries' output (vLLM, transformers, TRL) instead of logging it"),
) -> None:
    if STANDALONE and not verbose and ctx.invoked_subcommand in QUIET and "--help" not in sys.argv:
        import datetime
        import os

        from run.layout import Layout

        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        quiet(Layout().logs / f"{ctx.invoked_subcommand or 'bootstrap'}-{stamp}-{os.getpid()}.log")
    if ctx.invoked_subcommand is not None:
        return
    if stage is None and only is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    from pipeline.loop import run_bootstrap
    from run.recipe import with_recipe

    run_bootstrap(stage=stage, only=only, personas=with_recipe(persona, pairs, loss, introspect), profile=profile,
                  budget_usd=budget_usd, run_id=run_id, preset="quick" if quick else preset, counts_json=counts,
                  gpu_hour_usd=gpu_hour_usd, engine=engine, guard_policy=guard_policy, teacher=teacher,
                  one_resident=one_resident or None, ray=ray, ray_replicas=ray_replicas)


if __name__ == "__main__":
    STANDALONE = True
    app()
