"""Batch mode (`--batch`): a judge run's requests go through the provider's batch API at its batch price
(OpenAI Batch, Anthropic Message Batches: half price, results within 24 h), then the farm scores every item
from the judge cache as usual.

submit -> persist the batch id -> poll -> download into the cache, billed per request. The batch ids live in
the judge cache's SQLite file (`judge_batches`, `judge_batch_requests`), so a run killed while a batch is out
finds it there and polls it instead of submitting (and paying) again; a request's result is billed once.
Scorers that read in rounds (the exact path) get one batch per round.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cai_bootstrap.core.console import console
from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.core.io import canonical_json, open_sqlite
from cai_bootstrap.core.ledger import Ledger
from cai_bootstrap.judge.cache import Cache, ChatRequest, cache_key, key_parts
from cai_bootstrap.judge.client import EndpointState, _safe_snippet, parse_retry_after, token_counter
from cai_bootstrap.judge.config import Endpoint, JudgeConfig
from cai_bootstrap.judge.limits import Budget
from cai_bootstrap.judge.providers import Usage
from cai_bootstrap.judge.scorers import Scorer, ScorerError


@dataclass
class Outcome:
    """One request's result in a batch: the reply (chat-completion shape) and its usage, or why it failed."""

    custom_id: str
    body: dict | None = None
    usage: Usage | None = None
    error: str | None = None


class BatchError(Exception):
    """A batch call that cannot succeed (4xx, or retries exhausted)."""


class _API:
    """The HTTP calls one batch API needs, retried on 429/5xx/connection errors (a handful of calls per run)."""

    def __init__(self, client: httpx.AsyncClient, st: EndpointState, model: str) -> None:
        self.client, self.st, self.model = client, st, model
        self.base = st.ep.base_url.rstrip("/")

    def headers(self) -> dict[str, str]:
        key = self.st.ep.api_key()
        if self.st.ep.api_key_env and not key:
            raise BadInput(f"endpoint {self.st.ep.name}: environment variable {self.st.ep.api_key_env} is not set")
        return self.st.api.headers(key)

    async def call(self, method: str, url: str, **kw) -> httpx.Response:
        why = ""
        for attempt in range(8):
            wait = None
            try:
                resp = await self.client.request(method, url, headers=self.headers(), **kw)
            except httpx.TransportError as e:
                why = f"connection error ({type(e).__name__})"
            else:
                if resp.status_code < 300:
                    return resp
                why = f"http {resp.status_code}: {_safe_snippet(resp)}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise BatchError(f"{method} {url}: {why}")
                wait = parse_retry_after(resp.headers)
            await asyncio.sleep(wait if wait is not None else min(30.0, 0.5 * 2**attempt))
        raise BatchError(f"{method} {url}: {why}, 8 attempts")

    def body(self, req: ChatRequest) -> dict:
        return self.st.api.body(req, self.st.ep.model or self.model)


class OpenAIBatch(_API):
    """OpenAI Batch API: a JSONL file uploaded with purpose "batch", POST /batches, poll, download the output and
    error files (lines out of order, matched by custom_id)."""

    async def submit(self, lines: dict[str, ChatRequest]) -> str:
        jsonl = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                    "body": self.body(req)}) + "\n" for cid, req in lines.items())
        up = await self.call("POST", f"{self.base}/files", data={"purpose": "batch"},
                             files={"file": ("judge-batch.jsonl", jsonl.encode(), "application/jsonl")})
        made = await self.call("POST", f"{self.base}/batches", json={
            "input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        return made.json()["id"]

    async def poll(self, bid: str) -> tuple[bool, str, dict]:
        b = (await self.call("GET", f"{self.base}/batches/{bid}")).json()
        return b["status"] in ("completed", "failed", "expired", "cancelled"), b["status"], b

    async def results(self, info: dict) -> list[Outcome]:
        if info["status"] == "failed":  # rejected as a whole (validation): every request failed
            errs = "; ".join(e.get("message", "") for e in (info.get("errors") or {}).get("data", []))[:200]
            raise BatchError(f"batch {info['id']} failed: {errs}")
        out: list[Outcome] = []
        for fid in (info.get("output_file_id"), info.get("error_file_id")):
            if not fid:
                continue
            text = (await self.call("GET", f"{self.base}/files/{fid}/content")).text
            out += [self._line(json.loads(x)) for x in text.splitlines() if x.strip()]
        return out

    def _line(self, line: dict) -> Outcome:
        cid, resp = line["custom_id"], line.get("response") or {}
        if line.get("error") or resp.get("status_code") != 200:
            err = line.get("error") or (resp.get("body") or {}).get("error") or {}
            return Outcome(cid, error=f"batch: {resp.get('status_code') or err.get('code')}: "
                                      f"{err.get('message', '')}"[:200])
        try:
            body, usage = self.st.api.reply(resp["body"])
        except (KeyError, IndexError, TypeError, AttributeError):
            return Outcome(cid, error="batch: malformed result body")
        return Outcome(cid, body, usage)


class AnthropicBatch(_API):
    """Anthropic Message Batches: POST /messages/batches with the requests inline, poll until
    processing_status is "ended", stream the JSONL at results_url."""

    async def submit(self, lines: dict[str, ChatRequest]) -> str:
        reqs = [{"custom_id": cid, "params": self.body(req)} for cid, req in lines.items()]
        return (await self.call("POST", f"{self.base}/messages/batches", json={"requests": reqs})).json()["id"]

    async def poll(self, bid: str) -> tuple[bool, str, dict]:
        b = (await self.call("GET", f"{self.base}/messages/batches/{bid}")).json()
        return b["processing_status"] == "ended", b["processing_status"], b

    async def results(self, info: dict) -> list[Outcome]:
        text = (await self.call("GET", info["results_url"])).text
        return [self._line(json.loads(x)) for x in text.splitlines() if x.strip()]

    def _line(self, line: dict) -> Outcome:
        cid, res = line["custom_id"], line.get("result") or {}
        if res.get("type") != "succeeded":
            err = ((res.get("error") or {}).get("error") or {})
            return Outcome(cid, error=f"batch: {res.get('type')}: {err.get('message', '')}".rstrip(": ")[:200])
        try:
            body, usage = self.st.api.reply(res["message"])
        except (KeyError, IndexError, TypeError, AttributeError):
            return Outcome(cid, error="batch: malformed result message")
        return Outcome(cid, body, usage)


BATCH_APIS = {"openai": OpenAIBatch, "anthropic": AnthropicBatch}


class BatchStore:
    """Batch ids and what each asked, in the judge cache's file: a resumed run polls, never resubmits."""

    def __init__(self, path: str | Path) -> None:
        self.db = open_sqlite(Path(path), autocommit=True)
        self.db.execute("CREATE TABLE IF NOT EXISTS judge_batches (id TEXT PRIMARY KEY, endpoint TEXT, "
                        "provider TEXT, created REAL, status TEXT, collected INTEGER DEFAULT 0)")
        self.db.execute("CREATE TABLE IF NOT EXISTS judge_batch_requests (batch TEXT, custom_id TEXT, "
                        "parts TEXT, worst REAL, item TEXT, billed INTEGER DEFAULT 0, "
                        "PRIMARY KEY (batch, custom_id))")

    def add(self, bid: str, ep: Endpoint, reqs: dict[str, tuple[dict, float, str]]) -> None:
        with self.db:
            self.db.execute("INSERT INTO judge_batches VALUES (?,?,?,?,?,0)",
                            (bid, ep.name, ep.provider, time.time(), "submitted"))
            self.db.executemany("INSERT INTO judge_batch_requests VALUES (?,?,?,?,?,0)",
                                [(bid, cid, canonical_json(p), w, item) for cid, (p, w, item) in reqs.items()])

    def pending(self, keys: set[str], endpoint: str) -> dict[str, set[str]]:
        """Uncollected batches on this endpoint holding any of `keys`: batch id -> the keys it holds."""
        out: dict[str, set[str]] = {}
        rows = self.db.execute("SELECT r.batch, r.custom_id FROM judge_batch_requests r JOIN judge_batches b "
                               "ON b.id = r.batch WHERE b.collected = 0 AND b.endpoint = ?", (endpoint,))
        for bid, cid in rows:
            if cid in keys:
                out.setdefault(bid, set()).add(cid)
        return out

    def requests(self, bid: str) -> dict[str, tuple[dict, float, str, bool]]:
        rows = self.db.execute("SELECT custom_id, parts, worst, item, billed FROM judge_batch_requests "
                               "WHERE batch = ?", (bid,))
        return {cid: (json.loads(p), w, item, bool(b)) for cid, p, w, item, b in rows}

    def billed(self, bid: str, cid: str) -> None:
        self.db.execute("UPDATE judge_batch_requests SET billed = 1 WHERE batch = ? AND custom_id = ?", (bid, cid))

    def finish(self, bid: str, status: str) -> None:
        self.db.execute("UPDATE judge_batches SET status = ?, collected = 1 WHERE id = ?", (status, bid))

    def close(self) -> None:
        self.db.close()


@dataclass
class BatchReport:
    batches: list[dict] = field(default_factory=list)  # id, status, requests, succeeded, failed, resumed
    failed: dict[str, str] = field(default_factory=dict)  # cache key -> why its request has no result
    budget_unsent: set[str] = field(default_factory=set)  # keys not submitted: the cap would be passed
    usd: float = 0.0


class BatchRunner:
    """Fills the judge cache with the results of every request a list of items needs, through one endpoint's
    batch API, in rounds (a scorer's follow-up requests depend on the replies before them)."""

    def __init__(self, config: JudgeConfig, endpoint: Endpoint, cache: Cache, ledger: Ledger | None,
                 budget: Budget, *, run: str, purpose: str, phase: str, model: str, template_version: str,
                 poll_s: float | None = None, on_status: Callable[[str], None] | None = None) -> None:
        if endpoint.local or endpoint.provider not in BATCH_APIS:
            raise BadInput(f"--batch: endpoint {endpoint.name} has no batch API (the embedded local server "
                           "has none); use an OpenAI or Anthropic endpoint")
        self.cfg, self.ep, self.cache, self.ledger, self.budget = config, endpoint, cache, ledger, budget
        self.run, self.purpose, self.phase, self.model, self.tv = run, purpose, phase, model, template_version
        self.st = EndpointState(endpoint, config)
        self.poll_s = config.batch_poll_s if poll_s is None else poll_s
        self.store = BatchStore(cache.path)
        self.report = BatchReport()
        self.fresh: set[str] = set()  # keys fetched in this run (anchors are re-judged every run)
        self.say = on_status or (lambda msg: console.print(msg, soft_wrap=True))
        self._count = None

    async def fill(self, items: list[dict], scorer: Scorer) -> BatchReport:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0), trust_env=False) as client:
            api = BATCH_APIS[self.ep.provider](client, self.st, self.model)
            while need := self._needed(items, scorer):
                pending = self.store.pending(set(need), self.ep.name)
                held = set().union(*pending.values()) if pending else set()
                todo = {k: v for k, v in need.items() if k not in held}
                bids = [(bid, True) for bid in pending]
                if todo and (bid := await self._submit(api, todo)):
                    bids.append((bid, False))
                if not bids:
                    break  # nothing fits under the cap
                for bid, resumed in bids:
                    await self._collect(api, bid, resumed)
        self.store.close()
        return self.report

    def _needed(self, items: list[dict], scorer: Scorer) -> dict[str, tuple[ChatRequest, dict]]:
        """Every request the items still need (cache key -> (request, item)): the first round's, then each
        scorer follow-up once the replies it depends on are cached. Anchors are asked again every run."""
        need: dict[str, tuple[ChatRequest, dict]] = {}
        skip = set(self.report.failed) | self.report.budget_unsent
        for it in items:
            try:
                reqs = scorer.requests(it)
            except ScorerError:
                continue  # the farm reports it as invalid
            replies: dict[str, dict] = {}
            while reqs:
                missing = False
                for name, req in reqs.items():
                    key = cache_key(self.model, req, self.tv)
                    hit = self.cache.get(key) if (key in self.fresh or not it.get("anchor")) else None
                    if hit is None:
                        missing = True
                        if key not in skip:
                            need.setdefault(key, (req, it))
                    else:
                        replies[name] = hit["body"]
                follow = getattr(scorer, "followups", None)
                if missing or follow is None:
                    break
                reqs = {n: r for n, r in follow(it, replies).items() if n not in replies}
        return need

    async def _submit(self, api: _API, todo: dict[str, tuple[ChatRequest, dict]]) -> str | None:
        """Submit what fits under the budget (worst case at the batch price, reserved); returns the batch id."""
        lines: dict[str, ChatRequest] = {}
        rows: dict[str, tuple[dict, float, str]] = {}
        total = 0.0
        for key, (req, it) in todo.items():
            worst = self.st.worst_usd(req) * self.ep.batch_price
            if not self.budget.fits(total + worst):
                self.report.budget_unsent.add(key)
                self.budget.refused = True
                continue
            total += worst
            lines[key] = req  # custom_id: the cache key (64 hex characters, within both APIs' limits)
            rows[key] = (key_parts(self.model, req, self.tv), worst, str(it.get("id")))
        if not lines:
            return None
        self.budget.reserved += total
        bid = await api.submit(lines)
        self.store.add(bid, self.ep, rows)
        self.say(f"judge batch {bid} submitted to {self.ep.name}: {len(lines)} requests, worst case "
                 f"${total:.4f} at the batch price")
        return bid

    async def _collect(self, api: _API, bid: str, resumed: bool) -> None:
        asked = self.store.requests(bid)
        if resumed:  # submitted by an earlier run: its worst case is committed, reserve it for this one
            self.budget.reserved += sum(w for _, w, _, billed in asked.values() if not billed)
            self.say(f"judge batch {bid}: resumed (submitted by an earlier run), polling")
        info, status, t0 = await self._wait(api, bid)
        try:
            outcomes = await api.results(info)
        except BatchError as e:
            outcomes = [Outcome(cid, error=str(e)[:200]) for cid in asked]
        done = {o.custom_id for o in outcomes}
        outcomes += [Outcome(cid, error=f"batch: no result ({status})") for cid in asked if cid not in done]
        ok = sum(self._book(bid, o, asked) for o in outcomes if o.custom_id in asked)
        self.store.finish(bid, status)
        self.report.batches.append({"id": bid, "status": status, "requests": len(asked), "succeeded": ok,
                                    "failed": len(asked) - ok, "resumed": resumed,
                                    "seconds": round(time.monotonic() - t0, 1)})
        self.say(f"judge batch {bid}: {status}, {ok} of {len(asked)} requests answered")

    async def _wait(self, api: _API, bid: str) -> tuple[dict, str, float]:
        t0, last = time.monotonic(), None
        while True:
            ended, status, info = await api.poll(bid)
            if status != last:
                self.say(f"judge batch {bid}: {status}")
                last = status
            if ended:
                return info, status, t0
            await asyncio.sleep(self.poll_s)

    def _book(self, bid: str, o: Outcome, asked: dict) -> bool:
        """Cache and bill one result (once: a result downloaded again after a kill is not billed again)."""
        parts, worst, item, billed = asked[o.custom_id]
        if o.body is None:
            self.budget.settle(worst, 0.0)
            self.report.failed[o.custom_id] = o.error or "batch: no result"
            return False
        usage, estimated = o.usage, o.usage is None
        if usage is None:  # counted as the live path counts a reply without usage
            self._count = self._count or token_counter(self.cfg)
            prompt = "\n".join(m.get("content", "") for m in parts["messages"])
            text = o.body["choices"][0]["message"].get("content") or ""
            usage = Usage(self._count(prompt), self._count(text))
        usd = self.st.usd(usage.tokens_in, usage.tokens_out) * self.ep.batch_price
        self.cache.put(o.custom_id, parts, {"body": o.body, "endpoint": f"{self.ep.name}:batch",
                                            "tokens_in": usage.tokens_in, "tokens_out": usage.tokens_out})
        self.fresh.add(o.custom_id)
        if billed:
            self.budget.settle(0.0, 0.0)
            return True
        self.budget.settle(worst, usd)
        self.report.usd += usd
        if self.ledger is not None:
            self.ledger.record(run=self.run, kind="api", phase=self.phase, purpose=self.purpose, item=item,
                               endpoint=f"{self.ep.name}:batch", model=self.model, tokens_in=usage.tokens_in,
                               tokens_out=usage.tokens_out, usd=usd, estimated=estimated)
        self.store.billed(bid, o.custom_id)
        return True


def batch_misses(report: BatchReport) -> dict[str, Any]:
    """For the farm's cache-only pass: cache key -> why its request has no result ("budget" when unsent)."""
    return report.failed | {k: "budget" for k in report.budget_unsent}
