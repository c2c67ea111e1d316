"""The models of a run, by name: each EM arm's final model (persona ⊕ EM stacked, or the EM adapter alone for
the base arm) and the bare base model; and the run's judged EM answers."""

from __future__ import annotations

import json
from pathlib import Path

from cai_bootstrap.core.errors import MissingInput
from cai_bootstrap.run.config import load_run_config
from cai_bootstrap.run.layout import BASE_ARM, RunPaths

BARE = "bare"  # the base model with no adapter (the "base" arm is the EM adapter on the bare base)


def judged_rows(run_path: Path) -> list[dict]:
    path = RunPaths(run_path).em_judged
    if not path.is_file():
        raise MissingInput(f"{path} does not exist: run `python bootstrap.py em run --run {run_path.name}` first")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not JSON: {e}") from None
        for f in ("id", "arm", "question", "answer"):
            if f not in r:
                raise ValueError(f"{path}:{i}: row has no {f!r} field")
        rows.append(r)
    return rows


def run_models(run_path: Path) -> tuple[str, object, dict[str, Path | None]]:
    """(run id, RunConfig, {model name: adapter dir or None}) with the EM arms first and `bare` last."""
    from cai_bootstrap.train.stack import served_adapter

    run_id, cfg = load_run_config(run_path)
    summary = RunPaths(run_path).em_summary
    mode = json.loads(summary.read_text()).get("mode", "on-top") if summary.is_file() else "on-top"
    models: dict[str, Path | None] = {}
    for arm in [*cfg.personas, BASE_ARM]:
        em = cfg.layout.em_adapter(arm, mode)
        if not (em / "adapter_config.json").is_file():
            raise MissingInput(f"arm {arm!r}: no EM adapter at {em} (run `python bootstrap.py em run` first)")
        pa = None
        if arm != BASE_ARM:
            pa = cfg.layout.persona_adapter(arm, cfg.stage)
            if not (pa / "adapter_config.json").is_file():
                raise MissingInput(f"arm {arm!r}: no persona adapter at {pa}")
        models[arm] = served_adapter(pa, em, cfg.layout.stacked)
    models[BARE] = None
    return run_id, cfg, models
