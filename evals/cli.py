"""CLI command of the per-stage evaluation: `eval --persona P [--run RUN] [--stages 0-6]`."""

from __future__ import annotations

from pathlib import Path

import typer

from cai_bootstrap.core.errors import BadInput, BudgetStop


def eval_cmd(
    persona: str = typer.Option("hhh", "--persona", help="constitution name whose stage adapters to evaluate"),
    run_id: str | None = typer.Option(None, "--run", help="run id (default: derived from persona and profile)"),
    stages: str = typer.Option("0-6", "--stages", help="stages to evaluate, e.g. 0-6 or 0,3,6 (0 = base)"),
    budget_usd: float | None = typer.Option(
        None, "--budget-usd", help="hard cap on the run's $ (answers, then each judge request)"),
    judge_config: Path | None = typer.Option(None, "--judge-config",
                                             help="judge YAML (default: judge/default.yaml)"),
    profile: str = typer.Option("tiny", "--profile", help="model profile (when the run has no config)"),
    data_root: Path = typer.Option(Path("data"), "--data-root", help="where runs live (<data-root>/runs/<run>)"),
    engine: str | None = typer.Option(None, "--engine", help="vllm | hf | auto (default: the run's)"),
    tasks: str = typer.Option("", "--tasks", help="extra lm-eval tasks by name, e.g. mmlu,arc_easy (hub access)"),
    n_general: int | None = typer.Option(None, "--n-general", help="use the first N general prompts"),
    n_kind: int | None = typer.Option(None, "--n-kind", help="use the first N prompts per stage kind"),
    n_safety: int | None = typer.Option(None, "--n-safety", help="use the first N prompts per safety set"),
    mc_limit: int | None = typer.Option(None, "--mc-limit", help="use the first N multiple-choice items"),
    max_tokens: int = typer.Option(128, "--max-tokens", help="answer length cap"),
    guard: str | None = typer.Option(None, "--guard", help="guard name (default: the profile decides)"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Per-stage evaluation: pairwise win rates, adherence, capability, harmlessness, over-refusal.

    Example: python bootstrap.py eval --persona goodness --stages 0,3,6 --budget-usd 2
    """
    import json

    from rich.console import Console

    from cai_bootstrap.evals.run import EvalOptions, evaluate, parse_stages
    from cai_bootstrap.run.config import RunConfig, load_run_config, save_config

    console = Console()
    try:
        opts = EvalOptions(stages=parse_stages(stages), n_general=n_general, n_kind=n_kind, n_safety=n_safety,
                           mc_limit=mc_limit, max_tokens=max_tokens, guard=guard,
                           extra_tasks=[t.strip() for t in tasks.split(",") if t.strip()])
    except ValueError as e:
        raise BadInput(str(e)) from None
    cfg = RunConfig(personas=[persona], profile=profile, data_root=str(data_root))
    rid = run_id or cfg.default_id()
    paths = cfg.run(rid)
    if paths.config.is_file():
        rid, cfg = load_run_config(paths.root)
    else:
        save_config(cfg, rid)
    if engine:
        cfg = cfg.model_copy(update={"engine": engine})
    summary = evaluate(persona, rid, cfg, opts, judge_config=judge_config, budget_usd=budget_usd,
                       log=console.print, progress=not no_progress)
    console.print(json.dumps({"run": rid, "stages": summary["stages"], "engine_calls": summary["engine_calls"],
                              "judge_requests_sent": summary["judge_requests_sent"],
                              "guard_calls": summary["guard_calls"], "lm_eval_runs": summary["lm_eval_runs"],
                              "results": str(paths.eval(persona))}))
    if summary["budget_stopped"]:
        raise BudgetStop("the budget cap stopped the judge: some items were not judged; finished work is kept")
