"""The EM experiment's arms: an EM adapter per persona (on top of its persona adapter), the bare base as control,
and with secure-code data each persona's secure-code control; per training seed, trained or reused."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cai_bootstrap.core.budget import check_budget
from cai_bootstrap.core.console import console
from cai_bootstrap.core.errors import MissingInput
from cai_bootstrap.run.config import RunConfig
from cai_bootstrap.run.layout import BASE_ARM as BASE
from cai_bootstrap.run.layout import SECURE, is_secure, secure_arm


def persona_adapter(cfg: RunConfig, persona: str) -> Path:
    """The persona's adapter (its recipe's: run.recipe), which must exist."""
    path = cfg.layout.persona_adapter(persona, cfg.stage)
    if not (path / "adapter_config.json").is_file():
        raise MissingInput(f"persona {persona!r} has no persona adapter at {path}: run "
                           f"`python bootstrap.py --stage {cfg.stage} --persona {persona}` first")
    return path


def train_em_arms(cfg: RunConfig, run_id: str, data: Path, mode: str, ledger,
                  secure: Path | None = None, budget: float | None = None,
                  on_training: Callable[[], None] | None = None) -> dict[tuple[str, int], dict]:
    """Train (or reuse) the EM adapter per arm and seed; {(arm, seed): {persona_adapter, em, checkpoints, ...}}.
    With `secure` chats, each persona also gets its secure-code control arm ("<persona>+secure"): the same
    training on top of the same persona adapter, on the secure twin of the data. Each training that is not a
    reuse first checks the run's budget against its estimate, and calls `on_training`. An arm trained now is
    marked `trained`."""
    from cai_bootstrap.em.pricing import em_train_seconds
    from cai_bootstrap.train.config import em_defaults
    from cai_bootstrap.train.dpo import finished
    from cai_bootstrap.train.em import em_reusable
    from cai_bootstrap.train.worker import run_training

    c = cfg.counts
    arms: dict[tuple[str, int], dict] = {}
    controls = [secure_arm(p) for p in cfg.personas] if secure else []
    for arm in [*cfg.personas, BASE, *controls]:
        pa = persona_adapter(cfg, arm.removesuffix(SECURE)) if arm != BASE else None
        arm_mode = "base" if arm == BASE else mode
        arm_data = secure if is_secure(arm) else data
        for seed in range(c.em_seeds):
            ecfg = em_defaults(cfg.profile, max_steps=c.em_max_steps, max_rows=c.em_rows,
                               save_every=c.em_save_every, seed=cfg.seed + seed)
            out = cfg.layout.em_adapter(arm, arm_mode, seed)
            prev = finished(out)
            trained = em_reusable(out, arm_data, ecfg, cfg.profile, arm_mode, pa) is None
            if trained:
                rows = sum(1 for line in Path(arm_data).open() if line.strip())
                check_budget(ledger, run_id, budget, f"EM training of {arm}, seed {seed}",
                             em_train_seconds(cfg, rows) * cfg.usd_per_engine_second)
                if on_training:
                    on_training()
            t0 = time.perf_counter()
            # train_em reuses a finished run with equal inputs without loading any model; on CUDA it trains in
            # its own process so the GPU is fully released for the answering engine afterwards
            man = run_training("em", data=str(arm_data), out=str(out), cfg=ecfg, profile=cfg.profile, mode=arm_mode,
                               persona_adapter=str(pa) if pa else None)
            secs = time.perf_counter() - t0
            if man != prev:  # trained now (a reuse hands back the stored manifest unchanged)
                ledger.record(run=run_id, kind="engine", phase="em-train", persona=arm, purpose="em-sft",
                              model=cfg.profile, seconds=secs, usd=secs * cfg.usd_per_engine_second, estimated=True)
            ckpts = {int(n.split("-")[1]): out / n for n in man.get("checkpoints", [])}
            arms[(arm, seed)] = {"persona_adapter": pa, "em": out, "checkpoints": ckpts, "mode": arm_mode,
                                 "steps": man["steps"], "trained": trained}
            console.print(f"EM adapter for {arm}, seed {seed}: {out} ({man['steps']} steps, mode {arm_mode})")
    return arms
