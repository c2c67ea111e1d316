"""Command-line options several rooms' commands share (the main run, `em`, `estimate`, `demo`), and the run
config they build: one definition of each flag's help."""

from __future__ import annotations

import typer

from cai_bootstrap.run.config import RunConfig

PERSONAS = typer.Option(["hhh"], "--persona", help="persona(s) (constitution names)")
PRESET = typer.Option("research", "--preset", help="counts preset: research | demo | quick")
COUNTS = typer.Option(None, "--counts", help='JSON overrides of the preset\'s counts, e.g. \'{"n_tasks": 4}\'')
RAY_REPLICAS = typer.Option(None, "--ray-replicas", min=1, help="engine replicas under --ray (default: the profile's "
                            "data_parallel_size)")


def ray_option(what: str):
    return typer.Option(None, "--ray", help=f"{what} on Ray Data workers, one vLLM engine each (the profile's "
                        "data_parallel_size): `local` starts Ray here, or a cluster's ADDRESS")


def run_config(personas: list[str], profile: str, preset: str, stage: int = 6, counts_json: str | None = None,
               gpu_hour_usd: float | None = None) -> RunConfig:
    """A run's config from its command line; an unknown profile, recipe, preset or count stops here."""
    from cai_bootstrap.engine.models import get_profile
    from cai_bootstrap.run.config import counts_from
    from cai_bootstrap.run.recipe import canonical

    get_profile(profile)
    return RunConfig(personas=[canonical(p) for p in personas], profile=profile, stage=stage,
                     gpu_hour_usd=gpu_hour_usd, counts=counts_from(preset, counts_json, profile=profile))
