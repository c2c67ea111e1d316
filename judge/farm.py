"""The farm: stream items through a bounded queue to a fixed set of workers, cache-first, budgeted.

Memory stays flat however many items come in: one producer reads the input lazily into a queue of
about twice the worker count, and a fixed number of workers drain it (a million items never become a
million tasks). Each result is cached and ledgered the moment it arrives, so a rerun or a resume after
kill -9 sends only what is missing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cai_bootstrap.core.ledger import Ledger
from cai_bootstrap.judge.cache import Cache, ChatRequest, cache_key, key_parts
from cai_bootstrap.judge.client import ItemFailed, NoEndpoint, PathUnsupported, Pool
from cai_bootstrap.judge.config import JudgeConfig
from cai_bootstrap.judge.limits import Budget, BudgetExceeded
from cai_bootstrap.judge.scorers import Scorer, ScorerError

_DONE = object()


@dataclass
class Result:
    id: Any
    status: str  # ok | failed | invalid | budget
    item: dict
    scores: dict = field(default_factory=dict)
    reason: str | None = None
    endpoint: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    usd: float = 0.0
    cached: bool = False

    def row(self) -> dict:
        """The output row: the input row carried through, plus scores and judge bookkeeping."""
        return {
            **self.item,
            **self.scores,
            "judge_status": self.status,
            "judge_reason": self.reason,
            "judge_endpoint": self.endpoint,
            "judge_tokens_in": self.tokens_in,
            "judge_tokens_out": self.tokens_out,
            "judge_usd": round(self.usd, 8),
            "cached": self.cached,
        }


@dataclass
class Summary:
    run: str
    items: int = 0
    ok: int = 0
    failures: Counter = field(default_factory=Counter)  # reason kind -> count
    cached_items: int = 0
    usd: float = 0.0
    budget_stopped: bool = False
    remaining: int = 0  # items not sent because the budget ran out
    remaining_usd: float = 0.0  # their worst-case cost
    requests_sent: int = 0
    r429: int = 0
    retries: int = 0
    failed_attempts: dict = field(default_factory=dict)  # by status ("http 500", "timeout", ...), never billed
    estimated: int = 0  # replies billed by our token count: the provider reported no usage
    endpoints_dropped: dict = field(default_factory=dict)  # name -> why (refused, 401/403/404)
    no_endpoint: bool = False  # every endpoint was dropped: the run stopped
    overrun_usd: float = 0.0  # $ the provider reported past the reserved worst cases (flagged in the ledger)
    seconds: float = 0.0
    drift: dict | None = None
    batches: list = field(default_factory=list)  # batch mode: one entry per provider batch (judge.batch)
    path: str | None = None  # how the judge's numbers were read (core.reading): logprobs | exact | sampled
    path_switches: list = field(default_factory=list)  # e.g. "logprobs -> sampled: http 400 ... logprobs"
    path_why: str | None = None

    def as_dict(self) -> dict:
        d = self.__dict__.copy()
        d["failures"] = dict(self.failures)
        d["usd"] = round(self.usd, 8)
        d["remaining_usd"] = round(self.remaining_usd, 8)
        return d


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" from ")[0][:40]


async def _aiter(items: Iterable[dict] | AsyncIterable[dict]):
    if hasattr(items, "__aiter__"):
        async for it in items:  # type: ignore[union-attr]
            yield it
    else:
        for it in items:  # type: ignore[union-attr]
            yield it


class Farm:
    def __init__(
        self,
        scorer: Scorer,
        config: JudgeConfig,
        cache: Cache | None,
        ledger: Ledger | None,
        budget_usd: float | None,
        run: str,
        purpose: str,
        model: str,
        endpoints,
        *,
        phase: str = "judge",
        persona_field: str = "persona",
    ) -> None:
        self.scorer, self.cfg, self.cache, self.ledger = scorer, config, cache, ledger
        self.run, self.purpose, self.model, self.phase, self.persona_field = (
            run,
            purpose,
            model,
            phase,
            persona_field,
        )
        spent = ledger.total_usd(run) if (ledger is not None and budget_usd is not None) else 0.0
        self.budget = Budget(budget_usd, spent)
        self.spent_at_start = spent
        self.pool = Pool(config, endpoints, self.budget)
        self.summary = Summary(run=run)
        self.stop: str | None = None  # why nothing more is sent: "budget" or "no endpoint"
        # batch mode: every reply is in the cache already (judge.batch); a miss says why it has none
        self.batch_misses: dict[str, str] | None = None

    # ---------------------------------------------------------------- one request, cache first
    async def _one(self, item: dict, name: str, req: ChatRequest, deadline: float, use_cache: bool):
        key = cache_key(self.model, req, self.scorer.template_version) if self.cache is not None else None
        hit = self.cache.get(key) if (key is not None and use_cache) else None
        if hit is not None:
            self._record(item, hit["endpoint"], hit["tokens_in"], hit["tokens_out"], 0.0, cached=True)
            return hit, True
        if self.batch_misses is not None:
            why = self.batch_misses.get(key, "batch: no result")
            if why == "budget":
                raise BudgetExceeded("not submitted: the batch's worst case would pass the cap")
            raise ItemFailed(why)
        try:
            reply = await self.pool.send(req, deadline)
        except ItemFailed as e:
            if e.billed is not None:  # attempts the provider billed although they gave no usable answer
                b = e.billed
                self._record(item, None, b.tokens_in, b.tokens_out, b.usd, cached=False, estimated=b.estimated,
                             note=b.note)
            raise
        val = {
            "body": reply.body,
            "endpoint": reply.endpoint,
            "tokens_in": reply.tokens_in,
            "tokens_out": reply.tokens_out,
        }
        if self.cache is not None:
            self.cache.put(key, key_parts(self.model, req, self.scorer.template_version), val)
        self._record(item, reply.endpoint, reply.tokens_in, reply.tokens_out, reply.usd, cached=False,
                     estimated=reply.estimated, note=reply.note)
        return val | {"usd": reply.usd}, False

    def _record(self, item, endpoint, tin, tout, usd, cached, estimated=False, note=None):
        if self.ledger is not None:
            self.ledger.record(
                run=self.run,
                kind="api",
                phase=self.phase,
                purpose=self.purpose,
                persona=item.get(self.persona_field) if isinstance(item, dict) else None,
                endpoint=endpoint,
                model=self.model,
                item=str(item.get("id")),
                tokens_in=tin,
                tokens_out=tout,
                usd=usd,
                cached=cached,
                estimated=estimated,
                note=note,
            )

    async def judge(self, item: dict) -> Result:
        iid = item.get("id")
        path = getattr(self.scorer, "path", None)
        try:
            reqs = self.scorer.requests(item)
        except ScorerError as e:
            return Result(iid, "invalid", item, reason=str(e))
        if self.stop == "budget":
            return Result(iid, "budget", item, reason="budget: not sent, the cap was reached")
        deadline = time.monotonic() + self.cfg.retry.deadline_s
        # anchors are re-judged every run, which is how drift shows (batch mode fetched them fresh already)
        use_cache = not item.get("anchor") or self.batch_misses is not None
        replies: dict[str, dict] = {}
        tally = {"usd": 0.0, "tokens_in": 0, "tokens_out": 0, "cached": True, "endpoints": set()}
        errs: list[BaseException] = []
        while reqs and not errs:  # a scorer that reads in rounds (the exact path) asks for more each round
            errs = await self._round(item, reqs, deadline, use_cache, replies, tally)
            if not errs:
                reqs = {n: r for n, r in self._followups(item, replies).items() if n not in replies}
        base = dict(endpoint=",".join(sorted(tally["endpoints"])) or None, tokens_in=tally["tokens_in"],
                    tokens_out=tally["tokens_out"], usd=tally["usd"])
        if any(isinstance(e, BudgetExceeded) for e in errs):
            self.stop = "budget"
            reason = f"budget: {next(e for e in errs if isinstance(e, BudgetExceeded))}"
            return Result(iid, "budget", item, reason=reason, cached=False, **base)
        if unsupported := next((e for e in errs if isinstance(e, PathUnsupported)), None):
            if self._switch_to_sampled(path, unsupported):
                return await self.judge(item)
        if nope := next((e for e in errs if isinstance(e, NoEndpoint)), None):
            self.stop = "no endpoint"
            return Result(iid, "failed", item, reason=nope.reason, cached=False, **base)
        if errs:
            e = errs[0]
            if not isinstance(e, ItemFailed):
                raise e
            return Result(iid, "failed", item, reason=e.reason, cached=False, **base)
        if getattr(self.scorer, "path", None) != path:  # switched while this item was read the old way
            return await self.judge(item)
        try:
            scores = self.scorer.score(item, replies)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            reason = f"unscorable reply: {type(e).__name__}: {e}"[:200]
            return Result(iid, "failed", item, reason=reason, cached=tally["cached"], **base)
        return Result(iid, "ok", item, scores=scores, cached=tally["cached"], **base)

    async def _round(self, item: dict, reqs: dict, deadline: float, use_cache: bool, replies: dict,
                     tally: dict) -> list[BaseException]:
        """Send one round of an item's requests at once; returns the errors."""
        names = list(reqs)
        outs = await asyncio.gather(*(self._one(item, n, reqs[n], deadline, use_cache) for n in names),
                                    return_exceptions=True)
        for n, o in zip(names, outs, strict=True):
            if isinstance(o, ItemFailed) and o.billed is not None:  # billed, though no usable answer came
                tally["usd"] += o.billed.usd
                tally["tokens_in"] += o.billed.tokens_in
                tally["tokens_out"] += o.billed.tokens_out
            if isinstance(o, BaseException):
                continue
            val, hit = o
            replies[n] = val["body"]
            tally["usd"] += val.get("usd", 0.0)
            tally["tokens_in"] += val["tokens_in"]
            tally["tokens_out"] += val["tokens_out"]
            tally["cached"] = tally["cached"] and hit
            tally["endpoints"].add(val["endpoint"])
        return [o for o in outs if isinstance(o, BaseException)]

    def _followups(self, item: dict, replies: dict) -> dict:
        follow = getattr(self.scorer, "followups", None)
        return follow(item, replies) if follow is not None else {}

    def _switch_to_sampled(self, path: str | None, e: PathUnsupported) -> bool:
        """The judge rejected a parameter only its path uses (logprobs, max_tokens, temperature): read it by
        sampling from now on. Once per farm; recorded in the summary. False when there is nothing to switch."""
        if path is None or path == "sampled" or not hasattr(self.scorer, "use_path"):
            return False
        if getattr(self.scorer, "path", None) != "sampled":
            self.scorer.use_path("sampled")
            self.summary.path_switches.append(f"{path} -> sampled: {e.reason}"[:300])
        return True

    def remaining_cost(self, item: dict) -> float:
        try:
            reqs = self.scorer.requests(item).values()
        except ScorerError:
            return 0.0
        cost = 0.0
        for r in reqs:
            if (
                self.cache is None
                or self.cache.get(cache_key(self.model, r, self.scorer.template_version)) is None
            ):
                cost += self.pool.worst_usd(r)
        return cost

    # ---------------------------------------------------------------- the stream
    async def run_stream(self, items, on_result: Callable[[Result], None]) -> Summary:
        t0 = time.monotonic()
        n_workers = self.cfg.workers
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * n_workers)
        s = self.summary

        async def produce():
            async for it in _aiter(items):
                if self.stop == "budget":  # the cap was reached: count what is left and its cost, send nothing
                    s.remaining += 1
                    s.remaining_usd += self.remaining_cost(it)
                    continue
                await queue.put(it)  # after "no endpoint", each is answered from the cache or counted failed
            for _ in range(n_workers):
                await queue.put(_DONE)

        async def work():
            while (it := await queue.get()) is not _DONE:
                if not isinstance(it, dict):
                    r = Result(None, "invalid", {"value": repr(it)[:80]}, reason="item is not a JSON object")
                elif self.stop == "no endpoint":  # each is written as not judged; a rerun sends only these
                    r = Result(it.get("id"), "failed", it, reason="no endpoint left: not sent")
                else:
                    r = await self.judge(it)
                self._tally(r)
                on_result(r)

        producer = asyncio.create_task(produce())
        workers = [asyncio.create_task(work()) for _ in range(n_workers)]
        try:
            await asyncio.gather(producer, *workers)
        finally:
            for t in (producer, *workers):
                t.cancel()
            await self.pool.aclose()
        st = self.pool.stats
        s.requests_sent, s.r429, s.retries = st.sent, st.r429, st.retries
        s.failed_attempts, s.estimated = dict(st.errors), st.estimated
        s.endpoints_dropped, s.no_endpoint = self.pool.dropped, self.stop == "no endpoint"
        s.budget_stopped = self.budget.refused
        s.overrun_usd = round(self.budget.overrun, 8)
        s.seconds = round(time.monotonic() - t0, 3)
        return s

    def _tally(self, r: Result) -> None:
        s = self.summary
        s.items += 1
        s.usd += r.usd
        if r.status == "ok":
            s.ok += 1
            s.cached_items += r.cached
        elif r.status == "budget":
            s.remaining += 1
            s.remaining_usd += self.remaining_cost(r.item)
        else:
            s.failures[_reason_kind(r.reason or r.status)] += 1


# ------------------------------------------------------------------------- progress
class _Progress:
    """done/total, rate, 429s, retries, $ spent and reserved, ETA (rich)."""

    def __init__(self, total: int | None, farm: Farm, enabled: bool) -> None:
        self.farm, self.enabled, self.p = farm, enabled, None
        if enabled:
            import sys

            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.p = Progress(
                TextColumn("judge"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f}/s"),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
                # a log file gets rich's default 80 columns, which cut the counts off this line
                console=None if sys.stdout.isatty() else Console(width=160),
            )
            self.task = self.p.add_task("judge", total=total, rate=0.0, stats="")
            self.t0 = time.monotonic()

    def __enter__(self):
        if self.p:
            self.p.start()
        return self

    def __exit__(self, *exc):
        if self.p:
            self.update()
            self.p.stop()

    def update(self) -> None:
        if not self.p:
            return
        f, st = self.farm, self.farm.pool.stats
        done = f.summary.items
        stats = (
            f"{st.r429} rate-limited · {st.retries} retried · {sum(f.summary.failures.values())} failed · "
            f"${f.budget.spent - f.spent_at_start:.4f} spent, ${f.budget.reserved:.4f} reserved"
        )
        self.p.update(
            self.task, completed=done, rate=done / max(1e-9, time.monotonic() - self.t0), stats=stats
        )


# ------------------------------------------------------------------------- the API
async def judge_stream(
    items,
    scorer: Scorer,
    config: JudgeConfig,
    cache: Cache | None,
    ledger: Ledger | None,
    budget_usd: float | None,
    run: str,
    purpose: str,
    on_result: Callable[[Result], None],
    *,
    progress: bool = True,
    total: int | None = None,
    anchors: list[dict] | None = None,
    model: str | None = None,
    endpoints=None,
    phase: str = "judge",
) -> Summary:
    """Judge a (possibly huge, lazy) stream; `on_result` gets each Result as it completes (any order).

    Pass `model`/`endpoints` when the caller already resolved them (e.g. a running local server);
    otherwise this resolves them from the config, starting the embedded vLLM server when no key is set.
    """
    if endpoints is None:
        from cai_bootstrap.judge.endpoints import serve_endpoints

        with serve_endpoints(config) as (m, eps):
            return await judge_stream(items, scorer, config, cache, ledger, budget_usd, run, purpose, on_result,
                                      progress=progress, total=total, anchors=anchors, model=m, endpoints=eps,
                                      phase=phase)
    apply_path(scorer, config)
    farm = Farm(scorer, config, cache, ledger, budget_usd, run, purpose, model or config.model, endpoints, phase=phase)
    farm.summary.path = getattr(scorer, "path", None)
    farm.summary.path_why = getattr(scorer, "path_why", None)
    if total is None and hasattr(items, "__len__"):
        total = len(items) + len(anchors or [])
    anchor_rows: list[dict] = []

    def sink(r: Result) -> None:
        if r.item.get("anchor"):
            anchor_rows.append({**r.item, **r.scores})
        on_result(r)
        bar.update()

    if config.batch:
        items = list(await _batch(farm, items, anchors or [], cache, ledger, purpose, phase))
    stream = _chain(anchors or [], items)
    with _Progress(total, farm, progress) as bar:
        summary = await farm.run_stream(stream, sink)
    summary.path = getattr(scorer, "path", None)  # after any switch to sampled
    if anchors:
        from cai_bootstrap.judge.scorers import drift_report

        summary.drift = drift_report(anchor_rows)
    return summary


async def _batch(farm: Farm, items, anchors: list[dict], cache: Cache | None, ledger: Ledger | None, purpose: str,
                 phase: str) -> list[dict]:
    """Batch mode: every request the items need goes through the provider's batch API into the cache first; the
    farm then reads each reply from there (a request the batch did not answer fails with the batch's reason)."""
    from cai_bootstrap.core.errors import BadInput
    from cai_bootstrap.judge.batch import BatchRunner, batch_misses

    if cache is None:
        raise BadInput("--batch needs the judge cache: results are downloaded into it")
    items = [it async for it in _aiter(items)]
    runner = BatchRunner(farm.cfg, farm.pool.states[0].ep, cache, ledger, farm.budget, run=farm.run,
                         purpose=purpose, phase=phase, model=farm.model, template_version=farm.scorer.template_version)
    report = await runner.fill([*anchors, *[it for it in items if isinstance(it, dict)]], farm.scorer)
    farm.batch_misses = batch_misses(report)
    farm.summary.batches = report.batches
    farm.summary.usd += report.usd  # billed at download; each item then reads its replies from the cache ($0)
    return items


def apply_path(scorer: Scorer, config: JudgeConfig) -> str | None:
    """Set a path-reading scorer's path for this judge (once per scorer: a switch to sampled sticks); returns
    why, or None when the scorer reads no numbers this way or was set already."""
    if not hasattr(scorer, "use_path") or getattr(scorer, "path_chosen", False):
        return None
    from cai_bootstrap.judge.endpoints import choose_path

    path, tokenize, why = choose_path(config)
    scorer.samples, scorer.max_completion_tokens = config.samples, config.max_completion_tokens
    scorer.answer_prefix = config.answer_prefix
    scorer.use_path(path, tokenize, config.exact_prune)
    scorer.path_chosen, scorer.path_why = True, why
    return why


async def _chain(first: list[dict], rest):
    for it in first:
        yield it
    async for it in _aiter(rest):
        yield it


async def judge_items(
    items,
    scorer: Scorer,
    config: JudgeConfig,
    cache: Cache | None = None,
    ledger: Ledger | None = None,
    budget_usd: float | None = None,
    run: str = "adhoc",
    purpose: str = "judge",
    **kw,
) -> tuple[list[Result], Summary]:
    """Judge a list; returns (results in input order, summary)."""
    items = list(items)
    got: dict[int, Result] = {}
    order = {id(it): i for i, it in enumerate(items)}
    extra: list[Result] = []

    def keep(r: Result) -> None:
        if id(r.item) in order:
            got[order[id(r.item)]] = r
        else:
            extra.append(r)  # anchors

    summary = await judge_stream(items, scorer, config, cache, ledger, budget_usd, run, purpose, keep, **kw)
    return [got[i] for i in sorted(got)] + extra, summary


def run_judge(
    items,
    scorer: Scorer,
    config: JudgeConfig,
    cache: Cache | None = None,
    ledger: Ledger | None = None,
    budget_usd: float | None = None,
    run: str = "adhoc",
    purpose: str = "judge",
    **kw,
) -> tuple[list[Result], Summary]:
    """Sync wrapper of `judge_items` for callers outside an event loop."""
    return asyncio.run(judge_items(items, scorer, config, cache, ledger, budget_usd, run, purpose, **kw))
