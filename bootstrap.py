"""cai-bootstrap CLI. `python bootstrap.py --stage 6` runs the bootstrap; the nouns below run one phase each.

`COMMANDS` is the whole command tree, noun by noun; each command is a function in its package's `cli.py`, which
imports typer and the light config modules (run.options) at top level so `--help` stays fast, and loads engines
inside the command.
"""

from __future__ import annotations

import importlib
import sys

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from cai_bootstrap.core.console import console, log_path, quiet
from cai_bootstrap.core.errors import CaiError
from cai_bootstrap.run.options import RAY_REPLICAS, ray_option

# noun -> (help, {verb: "module:function"}); the noun "" holds the top-level commands, a "*" before a verb puts it
# under "Start here" in --help
COMMANDS: dict[str, tuple[str, dict[str, str]]] = {
    "": ("", {"*demo": "pipeline.cli:demo", "*doctor": "engine.cli:doctor", "*estimate": "pipeline.cli:estimate",
              "eval": "evals.cli:eval_cmd", "cost": "pipeline.cli:cost", "report": "pipeline.cli:report"}),
    "stage": ("One bootstrap stage: its data, what an edited constitution regenerates, its DPO adapter.\n\n"
              "Example: python bootstrap.py stage generate --stage 1 --persona goodness",
              {"generate": "stages.cli:generate", "diff": "stages.cli:diff", "train": "train.cli:train"}),
    "em": ("The emergent-misalignment experiment: the arms (`em run`, the default), a second judge, one EM adapter, "
           "steering and decomposition.\n\nExample: python bootstrap.py em run --persona goodness --seeds 3",
           {"run": "em.cli:em", "rescore": "em.cli:em_rescore", "train": "train.cli:train_em",
            "steer": "analysis.cli:steer", "decompose": "analysis.cli:decompose"}),
    "judge": ("The LLM judge farm: judge a JSONL file (`judge run`, the default), calibrate the EM judge.\n\n"
              "Example: python bootstrap.py judge answers.jsonl --out judged.jsonl",
              {"run": "judge.cli:judge", "calibrate": "judge.cli:calibrate"}),
    "guard": ("Llama Guard 3: classify prompts and answers.\n\n"
              "Example: python bootstrap.py guard check \"How do I bake bread?\"", {"check": "guard.cli:guard_check"}),
    "model": ("The policy model: send it chats, stack two LoRA adapters.\n\n"
              "Example: python bootstrap.py model generate \"Hello\" --engine hf",
              {"generate": "engine.cli:generate_text", "stack": "train.cli:stack"}),
    "data": ("Data the project can use but never needs.\n\nExample: python bootstrap.py data fetch em-paper",
             {"fetch": "judge.cli:fetch"}),
}
DEFAULT_VERB = "run"  # a noun with this verb runs it when the next word is none of its verbs: `judge IN.jsonl`

# the flat names from before the nouns: they keep working, unlisted
SHORTCUTS = {"generate": "stage generate", "diff": "stage diff", "train": "stage train", "train-em": "em train",
             "em-rescore": "em rescore", "steer": "em steer", "decompose": "em decompose",
             "calibrate": "judge calibrate", "guard-check": "guard check", "generate-text": "model generate",
             "stack": "model stack"}

# commands whose libraries talk: their output goes to a log file (the run's run.log once the run is known),
# when this file runs as the program (not when a test invokes `app` in its own process)
STANDALONE = False
QUIET = {"", "demo", "eval", "stage generate", "stage train", "em run", "em rescore", "em train", "em steer",
         "em decompose", "judge run", "judge calibrate", "guard check", "model generate"}


class Noun(TyperGroup):
    """A noun's verbs. Typer and click have no default command (click #1654), hence the override."""

    def verb(self, args: list[str]) -> str | None:
        if args and args[0] in self.commands:
            return args[0]
        default = self.commands.get(DEFAULT_VERB)
        if default is None or args[:1] == ["--help"]:
            return None
        # a first word that is no option goes to the default verb only where that takes words (`judge IN.jsonl`);
        # elsewhere it is a mistyped verb, which the group names (`em rescor`: did you mean 'rescore'?)
        if not args or args[0].startswith("-") or any(p.param_type_name == "argument" for p in default.params):
            return DEFAULT_VERB
        return None

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if (verb := self.verb(args)) is not None and args[:1] != [verb]:
            args = [verb, *args]
        return super().parse_args(ctx, args)


class Root(TyperGroup):
    """The program: the flat shortcuts resolve to their nouns, and every command's expected errors
    (`core.errors.CaiError`) end as one red line and the class's exit code (the table in the README), never a
    traceback; anything else is a bug and keeps its traceback."""

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        if args and args[0] in SHORTCUTS:
            args = [*SHORTCUTS[args[0]].split(), *args[1:]]
        name, cmd, rest = super().resolve_command(ctx, args)
        verb = cmd.verb(rest) if isinstance(cmd, Noun) else None
        ctx.meta["cai.command"] = f"{name} {verb}" if verb else name  # what `main` decides quiet on
        return name, cmd, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CaiError as e:
            console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
            _log_hint()
            raise typer.Exit(e.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except TyperException as e:  # a usage error: click shows it on descriptor 2, which is the log when quiet
            if log_path() is None:
                raise
            e.show(file=console.file)
            raise typer.Exit(e.exit_code) from None
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


def _function(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(f"cai_bootstrap.{module}"), name)


def _build(app: typer.Typer) -> None:
    for noun, (help, verbs) in COMMANDS.items():
        group = app
        if noun:
            group = typer.Typer(cls=Noun, no_args_is_help=True, help=help)
            app.add_typer(group, name=noun, help=help, rich_help_panel="Steps")
        for verb, target in verbs.items():
            panel = "Start here" if verb.startswith("*") else None if noun else "Steps"
            group.command(verb.lstrip("*"), rich_help_panel=panel)(_function(target))


app = typer.Typer(
    cls=Root,
    help="Self-bootstrapping Constitutional AI pipeline and emergent-misalignment experiment.\n\n"
    "Example: python bootstrap.py --stage 6 --persona goodness --persona sycophancy",
    epilog="The flat names from before the nouns still work: " + ", ".join(SHORTCUTS) + ".",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
_build(app)


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
    command = ctx.meta.get("cai.command", "")
    if STANDALONE and not verbose and command in QUIET and "--help" not in sys.argv:
        import datetime
        import os

        from cai_bootstrap.run.layout import Layout

        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        quiet(Layout().logs / f"{command.replace(' ', '-') or 'bootstrap'}-{stamp}-{os.getpid()}.log")
    if ctx.invoked_subcommand is not None:
        return
    if stage is None and only is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    from cai_bootstrap.pipeline.loop import run_bootstrap
    from cai_bootstrap.run.recipe import with_recipe

    run_bootstrap(stage=stage, only=only, personas=with_recipe(persona, pairs, loss, introspect), profile=profile,
                  budget_usd=budget_usd, run_id=run_id, preset="quick" if quick else preset, counts_json=counts,
                  gpu_hour_usd=gpu_hour_usd, engine=engine, guard_policy=guard_policy, teacher=teacher,
                  one_resident=one_resident or None, ray=ray, ray_replicas=ray_replicas)


if __name__ == "__main__":
    STANDALONE = True
    app()
