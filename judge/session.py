"""One judge session: the public way every caller (the EM experiment, the per-stage evaluation, steering,
the `judge` command) judges items.

A session holds what a run's judging shares: the config, the judge cache, the run's ledger and budget,
and the endpoints, starting the embedded vLLM server once, and only when a request must go out:

    with judge.session(config_path, layout=cfg.layout, run=run_id, budget_usd=10) as js:
        results, summary = js.judge(rows, EMScorer(), purpose="em-eval")
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from pathlib import Path

from cai_bootstrap.core.errors import BudgetStop, ItemsFailed, Unreachable
from cai_bootstrap.core.ledger import Ledger
from cai_bootstrap.judge.cache import Cache, cache_key
from cai_bootstrap.judge.config import JudgeConfig, load_config
from cai_bootstrap.judge.endpoints import embeds_server, judge_model_name, serve_endpoints, usable_endpoints
from cai_bootstrap.judge.farm import Result, Summary, apply_path, judge_items, judge_stream
from cai_bootstrap.judge.local_server import on_cuda
from cai_bootstrap.judge.scorers import Scorer, ScorerError
from cai_bootstrap.run.layout import Layout


class JudgeSession:
    def __init__(self, config: JudgeConfig, *, layout: Layout, run: str, budget_usd: float | None = None,
                 ledger: Ledger | None = None, progress: bool = True) -> None:
        self.config, self.run, self.budget_usd, self.progress = config, run, budget_usd, progress
        self.eps = usable_endpoints(config)  # a config with no usable endpoint fails here, before any work
        self.model = judge_model_name(config)
        self.cache = Cache(config.cache_path or layout.judge_cache)
        self.server_log = layout.run(run).judge_server_log
        self._own_ledger = ledger is None
        self.ledger = ledger if ledger is not None else Ledger(layout.run(run).ledger)
        self._stack = contextlib.ExitStack()
        self._served: list | None = None
        self._starting: threading.Thread | None = None
        self._start_error: BaseException | None = None

    # ---- lifecycle
    def __enter__(self) -> JudgeSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prestart(self) -> None:
        """Start the endpoints (the embedded server, where the config has one) in the background, so that its
        start-up (about 30 s on 2 CPU cores) overlaps the work before the first judgment; `endpoints` waits
        for it. Without an embedded server there is nothing to start."""
        if self._served is not None or self._starting is not None or not embeds_server(self.config) or on_cuda():
            return  # on a GPU the server would claim its memory while the EM adapters train there

        def start() -> None:
            try:
                self._serve()
            except BaseException as e:  # noqa: BLE001 (raised again where the endpoints are asked for)
                self._start_error = e

        self._starting = threading.Thread(target=start, name="judge-server-start", daemon=True)
        self._starting.start()

    def close(self) -> None:
        if self._starting is not None:
            self._starting.join()
        self._stack.close()
        self.cache.close()
        if self._own_ledger:
            self.ledger.close()

    def endpoints(self) -> list:
        """The endpoints ready to take requests; the first call starts the embedded server if needed (or waits
        for `prestart`'s)."""
        if self._starting is not None:
            self._starting.join()
            self._starting, error, self._start_error = None, self._start_error, None
            if error is not None:
                raise error
        if self._served is None:
            self._serve()
        return self._served

    def _serve(self) -> None:
        model, served = self._stack.enter_context(serve_endpoints(self.config, self.server_log))
        assert model == self.model, f"judge model {model!r} is not the session's {self.model!r}"
        self._served = served

    # ---- before any spend
    def uncached(self, scorer: Scorer, items: list[dict]) -> tuple[int, float]:
        """(judge requests not in the cache, their worst-case $ on the dearest usable endpoint)."""
        apply_path(scorer, self.config)
        n, usd = 0, 0.0
        for it in items:
            try:
                reqs = scorer.requests(it).values()
            except ScorerError:
                continue  # the farm reports it as invalid; it sends nothing
            for req in reqs:
                if self.cache.get(cache_key(self.model, req, scorer.template_version)) is not None:
                    continue
                n += 1
                usd += max((req.prompt_bytes() * e.usd_per_m_in + req.max_out * e.usd_per_m_out) / 1e6
                           for e in self.eps)
        return n, usd

    def spent(self) -> float:
        return self.ledger.total_usd(self.run)

    # ---- judging
    async def stream(self, items, scorer: Scorer, on_result: Callable[[Result], None], *, purpose: str,
                     phase: str = "judge", anchors: list[dict] | None = None, total: int | None = None) -> Summary:
        """Judge a (possibly huge, lazy) stream; `on_result` gets each Result as it completes (any order)."""
        return await judge_stream(items, scorer, self.config, self.cache, self.ledger, self.budget_usd, self.run,
                                  purpose, on_result, progress=self.progress, total=total, anchors=anchors,
                                  model=self.model, endpoints=self.endpoints(), phase=phase)

    def judge(self, items: list[dict], scorer: Scorer, *, purpose: str, phase: str = "judge",
              anchors: list[dict] | None = None) -> tuple[list[Result], Summary]:
        """Judge a list; results in input order (anchors after). The embedded server starts only when some
        request is not cached."""
        items = list(items)
        apply_path(scorer, self.config)
        rounds = getattr(scorer, "path", None) == "exact"  # its later requests are not known before the replies
        if not anchors and not rounds and self.uncached(scorer, items)[0] == 0:
            endpoints = self._served or self.eps  # everything is cached: nothing will be sent
        else:
            endpoints = self.endpoints()
        return asyncio.run(judge_items(items, scorer, self.config, self.cache, self.ledger, self.budget_usd, self.run,
                                       purpose, progress=self.progress, anchors=anchors, model=self.model,
                                       endpoints=endpoints, phase=phase))


def check_complete(summary: Summary | dict, what: str = "the judge") -> None:
    """Raise the exit code of what a judge run left undone: Unreachable (7), then BudgetStop (3), then
    ItemsFailed (4); return when every item was judged. Callers write what was judged first: nothing judged
    is lost."""
    s = summary.as_dict() if isinstance(summary, Summary) else summary
    if s.get("no_endpoint"):
        dropped = "; ".join(f"{n}: {w}" for n, w in (s.get("endpoints_dropped") or {}).items())
        raise Unreachable(f"no judge endpoint is left for {what} ({dropped}); {s.get('ok', 0)} of "
                          f"{s.get('items')} items were judged and are kept")
    if s.get("budget_stopped") or s.get("remaining"):
        over = (f"; the provider billed ${s['overrun_usd']:.6f} past the reserved worst cases (flagged in the "
                "ledger), so no more was sent") if s.get("overrun_usd") else ""
        raise BudgetStop(f"the budget cap stopped {what}: {s.get('remaining')} items not sent (worst case "
                         f"${s.get('remaining_usd', 0):.6f}){over}; finished items are kept")
    failures = s.get("failures") or {}
    if failed := sum(failures.values()):
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(failures.items()))
        raise ItemsFailed(f"{failed} of {s.get('items')} items were not judged by {what} ({reasons}); a rerun "
                          "sends only those")


def session_or(shared: JudgeSession | None, config: JudgeConfig | str | Path | None = None, **kw):
    """A context manager giving `shared` (the caller's session, left open) or a new session closed on exit."""
    return contextlib.nullcontext(shared) if shared is not None else session(config, **kw)


def session(config: JudgeConfig | str | Path | None = None, *, layout: Layout | None = None, run: str,
            budget_usd: float | None = None, ledger: Ledger | None = None, progress: bool = True) -> JudgeSession:
    """A JudgeSession from a config (a JudgeConfig, a YAML path, or None for judge/default.yaml)."""
    cfg = config if isinstance(config, JudgeConfig) else load_config(config)
    return JudgeSession(cfg, layout=layout or Layout(), run=run, budget_usd=budget_usd, ledger=ledger,
                        progress=progress)
