"""A fault-injecting OpenAI-compatible chat-completions server (aiohttp, 127.0.0.1) for judge tests/bench.

It enforces a sliding-window request limit (429 + Retry-After beyond it), injects 5xx, timeouts (hangs,
then 504, never billed), slow bodies (trickled, billed once fully sent), malformed JSON (200, billed), and
counts every request. "Billed" means a 200 whose body was fully written, counted per prompt content so a
test can check that no item was paid twice. Content markers force faults per item: ALWAYS500, ALWAYS400.

The same app speaks Anthropic's Messages API (POST /v1/messages: the same limit, faults and billing, with
Anthropic's auth, validation and shapes; 529 for 503) and two batch APIs: Anthropic Message Batches
(/v1/messages/batches) and OpenAI Files + Batch (/v1/files, /v1/batches). A batch ends on the `batch_polls`-th
GET of it; its results are computed and billed (also in `batch_billed`) once, then. Batch routes are neither
limited nor fault-injected, and are not in `requests`/`status`.

Use in-process (`with FaultServer(...) as srv:` runs it on its own thread and loop) or as a process:
`python tests/fault_server.py --port 8123 --limit 600 --window 60` (prints `READY <port>`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web


@dataclass
class Faults:
    limit: int = 10_000  # requests per window (sliding)
    window_s: float = 60.0
    latency: tuple[float, float] = (0.0, 0.0)
    p_500: float = 0.0
    p_503: float = 0.0  # Anthropic's route answers 529 overloaded_error instead
    p_timeout: float = 0.0
    hang_s: float = 30.0
    p_slow: float = 0.0
    slow_s: float = 0.5
    p_malformed: float = 0.0
    p_429: float = 0.0  # extra random 429s (provider-side storms), with Retry-After
    retry_after_s: float | None = None  # fixed Retry-After for random 429s (None: 1 s)
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <api_key>` (Anthropic: x-api-key)
    seed: int = 0
    # a reasoning model (GPT-5, o-series): 400s for logprobs, max_tokens and a temperature other than 1, as
    # OpenAI words them; text replies ending with a number, reasoning tokens billed as output
    reasoning: bool = False
    p_unparsable: float = 0.0  # reasoning (and Anthropic) replies with no number in them
    no_usage: bool = False  # chat replies without `usage`, as some OpenAI-compatible servers send them
    over_report: float = 1.0  # multiplies the usage chat replies report (a provider billing past any estimate)
    bill_timeouts: bool = False  # a request left hanging is billed all the same (the work was done)
    # batches end on this many GETs of them; these fractions of their requests (seeded) come back errored
    # (api_error / 500) or expired instead of succeeding
    batch_polls: int = 2
    batch_p_errored: float = 0.0
    batch_p_expired: float = 0.0


@dataclass
class Counts:
    requests: int = 0
    status: Counter = field(default_factory=Counter)
    billed: Counter = field(default_factory=Counter)  # prompt hash -> fully delivered 200s (batch ones too)
    r429_limit: int = 0  # 429s caused by exceeding the limit (self-caused by the client)
    r429_random: int = 0
    starts: list = field(default_factory=list)  # arrival times (monotonic), for achieved-rate figures
    max_concurrent: int = 0
    in_flight: int = 0
    batch_billed: Counter = field(default_factory=Counter)  # prompt hash -> succeeded batch results
    batches_created: int = 0  # both APIs
    batch_polls: Counter = field(default_factory=Counter)  # batch id -> GETs of it
    arrivals: list = field(default_factory=list)  # (monotonic time, prompt hash) of each parsed live request
    random_429s: list = field(default_factory=list)  # (monotonic time, prompt hash) of each random 429 sent


@dataclass
class _Batch:
    obj: dict  # what the API returns for it, updated as it ends
    requests: list[tuple[str, object]]  # (custom_id, Messages params or chat body), as submitted
    errors: list[dict] = field(default_factory=list)  # OpenAI input-file problems: the batch fails
    polls: int = 0  # its own count: Counts are reset by tests, batches outlive that
    results: bytes = b""  # Anthropic: the results JSONL, computed once when it ends


# Anthropic's error type per status
_ANT_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# OpenAI/vLLM parameters a judge client might carry over, which the Messages API refuses
_ANT_EXTRA = ("logprobs", "top_logprobs", "n", "seed", "response_format", "max_completion_tokens",
              "continue_final_message", "add_generation_prompt")
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_CHAT_URL = "/v1/chat/completions"
_EXPIRED = "This request could not be executed before the completion window expired."


def _scale(content: str) -> tuple[int, int]:
    """The rubric's scale: "from 1 (...) to 10"; else 0-100."""
    m = re.search(r"from (\d+)\b.{0,40}? to (\d+)\b", content)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 100)


def _score_table(content: str) -> list[dict]:
    """Deterministic logprob table for a prompt: mostly integer tokens on the rubric's scale ("from 1 ... to
    10"; else 0-100), some text."""
    h = int(hashlib.sha256(content.encode()).hexdigest(), 16)
    lo, hi = _scale(content)
    s, span = lo + h % (hi - lo + 1), hi - lo + 1
    probs = [(str(s), 0.6), (str(lo + (s - lo + 7) % span), 0.25), ("I", 0.1), ("REF", 0.05)]
    return [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in probs]


def _verdict(content: str, seed: object, p_unparsable: float, bare: bool = False) -> str:
    """What a reasoning model writes, deterministic per (content, seed): "Answer A/B is better." to a pairwise
    prompt, else "Score: n" on the rubric's scale. bare: the letter or number alone (continuing a prefill)."""
    h = int(hashlib.sha256(f"{content}|{seed}".encode()).hexdigest(), 16)
    unparsable = (h % 1000) / 1000 < p_unparsable
    if "A or B" in content:  # a pairwise prompt: a letter, mostly A (shown first)
        if unparsable:
            return "Neither is better."
        letter = "A" if h % 4 else "B"
        return letter if bare else f"Answer {letter} is better."
    lo, hi = _scale(content)
    if unparsable:
        return "I would rather not put a figure on that."
    n = lo + h % (hi - lo + 1)
    return str(n) if bare else f"Score: {n}"


def _reasoning_400(body: dict) -> str | None:
    """What OpenAI's reasoning models answer to the parameters they do not take (None: the body is fine)."""
    if body.get("logprobs") or "top_logprobs" in body:
        return "logprobs are not supported with reasoning models."
    if "max_tokens" in body:
        return ("Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                "'max_completion_tokens' instead.")
    if "top_p" in body:
        return "Unsupported parameter: 'top_p' is not supported with this model."
    if body.get("temperature", 1) != 1:
        return (f"Unsupported value: 'temperature' does not support {body['temperature']} with this model. "
                "Only the default (1) value is supported.")
    return None


def _marker(content: str) -> tuple[int, str, str | None] | None:
    """The fault a content marker forces on an item, whatever the API (None: no marker)."""
    if "ALWAYS400" in content:
        return 400, "invalid request", None
    if "ALWAYS500" in content:
        return 500, "server error", None
    return None


def _as_text(content: object) -> str | None:
    """Anthropic message/system content as text: a string, or content blocks (text ones joined); None: neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in content):
        return "\n".join(b["text"] for b in content if b["type"] == "text" and isinstance(b.get("text"), str))
    return None


def _ant_invalid(body: object) -> str | None:
    """Why the Messages API answers 400 to this body, naming the field as it does (None: the body is fine)."""
    if not isinstance(body, dict):
        return "Input should be a valid dictionary"
    for k in _ANT_EXTRA:
        if k in body:
            return f"{k}: Extra inputs are not permitted"
    for k in ("model", "max_tokens", "messages"):
        if k not in body:
            return f"{k}: Field required"
    if not isinstance(body["model"], str):
        return "model: Input should be a valid string"
    mt = body["max_tokens"]
    if not isinstance(mt, int) or isinstance(mt, bool):
        return "max_tokens: Input should be a valid integer"
    if mt < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    msgs = body["messages"]
    if not isinstance(msgs, list):
        return "messages: Input should be a valid list"
    if not msgs:
        return "messages: at least one message is required"
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":
            return ('messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
                    'not "system" as an input message role.')
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if _as_text(m.get("content")) is None:
            return f"messages.{i}.content: Input should be a valid string or a list of content blocks"
    if msgs[0]["role"] != "user":
        return 'messages: first message must use the "user" role'
    if "system" in body and _as_text(body["system"]) is None:
        return "system: Input should be a valid string or a list of text blocks"
    t = body.get("temperature")
    if t is not None and (not isinstance(t, int | float) or isinstance(t, bool)):
        return "temperature: Input should be a valid number"
    if t is not None and not 0 <= t <= 1:
        return f"temperature: Input should be {'less' if t > 1 else 'greater'} than or equal to {int(t > 1)}"
    return None


def _ant_prompt(body: dict) -> tuple[str, str, bool]:
    """(content, scored, prefilled) of a valid Messages body: the prompt as one text, system first as the chat
    route joins it (what is billed); the same less a trailing assistant prefill (what the verdict depends on,
    so a prefill does not change the score); whether there is one."""
    system = _as_text(body["system"]) if "system" in body else ""
    texts = [_as_text(m["content"]) for m in body["messages"]]
    prefilled = body["messages"][-1]["role"] == "assistant"
    head = [system] if system else []
    return "\n".join(head + texts), "\n".join(head + (texts[:-1] if prefilled else texts)), prefilled


def _error(ant: bool, status: int, message: str, etype: str | None = None, headers: dict | None = None
           ) -> web.Response:
    """An error reply in the API's shape: OpenAI {"error": {...}}; Anthropic {"type": "error", "error": {...}}."""
    if ant:
        body = {"type": "error", "error": {"type": etype or _ANT_ERRORS[status], "message": message}}
    else:
        body = {"error": {"message": message, **({"type": etype} if etype else {})}}
    return web.json_response(body, status=status, headers=headers)


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


async def _read_json(request: web.Request) -> object:
    """The body as JSON, read from the stream: batches may be past aiohttp's 1 MiB `request.json()` cap."""
    return json.loads(await request.content.read())


class FaultApp:
    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.counts = Counts()
        self.window: deque[float] = deque()
        self.rng = random.Random(self.faults.seed)
        self.batch_rng = random.Random(f"batch|{self.faults.seed}")  # its own: batches leave live faults alone
        self.ant_batches: dict[str, _Batch] = {}
        self.oai_batches: dict[str, _Batch] = {}
        self.files: dict[str, tuple[dict, bytes]] = {}  # OpenAI file id -> (File object, content)

    def reset(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self.faults, k, v)
        self.counts = Counts()
        self.window.clear()
        self.rng = random.Random(self.faults.seed)
        self.batch_rng = random.Random(f"batch|{self.faults.seed}")

    def stats(self) -> dict:
        c = self.counts
        return {
            "requests": c.requests,
            "status": dict(c.status),
            "billed_total": sum(c.billed.values()),
            "billed_max_per_prompt": max(c.billed.values(), default=0),
            "billed_prompts": len(c.billed),
            "r429_limit": c.r429_limit,
            "r429_random": c.r429_random,
            "max_concurrent": c.max_concurrent,
            "first_start": c.starts[0] if c.starts else None,
            "last_start": c.starts[-1] if c.starts else None,
            "batch_billed_total": sum(c.batch_billed.values()),
            "batch_billed_prompts": len(c.batch_billed),
            "batches_created": c.batches_created,
            "batch_polls": sum(c.batch_polls.values()),
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/batches", self.ant_batch_create)
        app.router.add_get("/v1/messages/batches/{id}", self.ant_batch_get)
        app.router.add_get("/v1/messages/batches/{id}/results", self.ant_batch_results)
        app.router.add_post("/v1/files", self.file_upload)
        app.router.add_get("/v1/files/{id}", self.file_get)
        app.router.add_get("/v1/files/{id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.oai_batch_create)
        app.router.add_get("/v1/batches/{id}", self.oai_batch_get)
        app.router.add_get("/stats", self._stats_http)
        app.router.add_post("/reset", self._reset_http)
        return app

    async def _stats_http(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset_http(self, request: web.Request) -> web.Response:
        self.reset(**(await request.json()))
        return web.json_response({"ok": True})

    def _status(self, code: int) -> None:
        self.counts.status[code] += 1

    def _fail(self, ant: bool, status: int, message: str, etype: str | None = None, headers: dict | None = None
              ) -> web.Response:
        self._status(status)
        return _error(ant, status, message, etype, headers)

    def _denied(self, request: web.Request, ant: bool) -> web.Response | None:
        """The auth (and, for Anthropic, version header) refusal for a request; None: it may proceed."""
        key = self.faults.api_key
        if ant:
            if key is not None and request.headers.get("x-api-key") != key:
                return _error(True, 401, "invalid x-api-key")
            if "anthropic-version" not in request.headers:
                return _error(True, 400, "anthropic-version: header is required")
        elif key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return _error(False, 401, "invalid api key")
        return None

    def _bill(self, content: str, batch: bool = False) -> None:
        key = hashlib.sha256(content.encode()).hexdigest()
        self.counts.billed[key] += 1
        if batch:
            self.counts.batch_billed[key] += 1

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._live(request, False)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._live(request, True)

    async def _live(self, request: web.Request, ant: bool) -> web.StreamResponse:
        """One fault path for both live routes; `ant` picks Anthropic's auth, validation and shapes."""
        f, c = self.faults, self.counts
        c.requests += 1
        now = time.monotonic()
        c.starts.append(now)
        if (denied := self._denied(request, ant)) is not None:
            self._status(denied.status)
            return denied
        while self.window and now - self.window[0] >= f.window_s:
            self.window.popleft()
        if len(self.window) >= f.limit:
            c.r429_limit += 1
            wait = f.window_s - (now - self.window[0])
            return self._fail(ant, 429, "rate limit", headers={"retry-after" if ant else "Retry-After": f"{wait:.3f}"})
        self.window.append(now)
        try:
            body = await request.json()
            if ant and (why := _ant_invalid(body)) is not None:
                return self._fail(ant, 400, why)
            content = _ant_prompt(body)[0] if ant else "\n".join(m["content"] for m in body["messages"])
        except (ValueError, KeyError, TypeError):
            return self._fail(ant, 400, "bad request body")
        c.arrivals.append((now, hashlib.sha256(content.encode()).hexdigest()))
        c.in_flight += 1
        c.max_concurrent = max(c.max_concurrent, c.in_flight)
        try:
            return await self._answer(request, body, content, ant)
        finally:
            c.in_flight -= 1

    def _chat_reject(self, body: dict, content: str) -> tuple[int, str, str | None] | None:
        """The error the chat route answers to a body before any random fault (None: it answers 200)."""
        if self.faults.reasoning and (refusal := _reasoning_400(body)):
            return 400, refusal, "invalid_request_error"
        if "TOOLONG400" in content:  # vLLM's answer to a prompt that leaves no room for max_tokens
            return 400, ("'max_tokens' or 'max_completion_tokens' is too large: 1. This model's maximum context "
                         "length is 2048"), None
        return _marker(content)

    async def _answer(self, request, body, content, ant: bool = False) -> web.StreamResponse:
        f, rng = self.faults, self.rng
        if (reject := _marker(content) if ant else self._chat_reject(body, content)) is not None:
            return self._fail(ant, *reject)
        lo, hi = f.latency
        if hi > 0:
            await asyncio.sleep(rng.uniform(lo, hi))
        x, kind = rng.random(), None
        for p, k in (
            (f.p_429, 429),
            (f.p_500, 500),
            (f.p_503, 503),
            (f.p_timeout, "timeout"),
            (f.p_malformed, "malformed"),
            (f.p_slow, "slow"),
        ):
            if x < p:
                kind = k
                break
            x -= p
        if kind == 429:
            self.counts.r429_random += 1
            self.counts.random_429s.append((time.monotonic(), hashlib.sha256(content.encode()).hexdigest()))
            ra = f.retry_after_s if f.retry_after_s is not None else 1.0
            return self._fail(ant, 429, "overloaded", headers={"retry-after" if ant else "Retry-After": f"{ra:g}"})
        if kind == 503 and ant:
            return self._fail(ant, 529, "Overloaded")
        if kind in (500, 503):
            return self._fail(ant, kind, "upstream error")
        if kind == "timeout":
            if f.bill_timeouts:  # billed when the work is done, whether or not the client is still there
                self._bill(content)
            await asyncio.sleep(f.hang_s)
            return self._fail(ant, 504, "gateway timeout")
        payload = self._message(body) if ant else self._chat_payload(body, content)
        if kind == "malformed":
            self._status(200)
            self._bill(content)
            return web.Response(text=payload[: len(payload) // 2], content_type="application/json")
        resp = web.StreamResponse(status=200, headers={"content-type": "application/json"})
        await resp.prepare(request)
        data = payload.encode()
        if kind == "slow":
            step = max(1, len(data) // 5)
            for i in range(0, len(data), step):
                await resp.write(data[i : i + step])
                await asyncio.sleep(f.slow_s / 5)
        else:
            await resp.write(data)
        # delivered in full: the provider bills it. Counted before the closing chunk, which is what lets the client
        # finish: counted after it, a test could read the stats before this handler resumes.
        self._status(200)
        self._bill(content)
        await resp.write_eof()
        return resp

    def _chat_payload(self, body: dict, content: str) -> str:
        """The chat route's 200 body (the batch output reuses it)."""
        f = self.faults
        payload = (self._completion(body, content, True, f.p_unparsable) if f.reasoning
                   else self._completion(body, content))
        if f.no_usage:
            payload = json.dumps({k: v for k, v in json.loads(payload).items() if k != "usage"})
        elif f.over_report != 1.0:
            d = json.loads(payload)
            d["usage"] = {k: int(v * f.over_report) if isinstance(v, int) else v for k, v in d["usage"].items()}
            payload = json.dumps(d)
        return payload

    def _message(self, body: dict) -> str:
        """The Messages route's 200 body: a reasoning model's verdict (`_verdict`), its number or letter alone
        when it continues a prefill."""
        content, scored, prefilled = _ant_prompt(body)
        text = _verdict(scored, None, self.faults.p_unparsable, bare=prefilled)
        return json.dumps(
            {
                "id": f"msg_fault{secrets.token_hex(10)}",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": len(content) // 4 + 8,
                    "output_tokens": min(body["max_tokens"], len(text) // 4 + 1),
                },
            }
        )

    @staticmethod
    def _completion(body: dict, content: str, reasoning: bool = False, p_unparsable: float = 0.0) -> str:
        max_tokens = int(body.get("max_tokens") or 16)
        details = None
        if reasoning:
            text = _verdict(content, body.get("seed"), p_unparsable)
            logprobs, out_tokens, details = None, 48, {"reasoning_tokens": 40}
        elif body.get("logprobs"):
            table = _score_table(content)[: int(body.get("top_logprobs") or 1)]
            text = table[0]["token"]
            logprobs = {
                "content": [
                    {
                        "token": text,
                        "logprob": table[0]["logprob"],
                        "bytes": table[0]["bytes"],
                        "top_logprobs": table,
                    }
                ]
            }
            out_tokens = 1
        else:
            s = int(hashlib.sha256(content.encode()).hexdigest(), 16) % 10 + 1
            text = json.dumps({"score": s, "reason": "fault-server verdict"})
            logprobs, out_tokens = None, min(max_tokens, 12)
        return json.dumps(
            {
                "id": "chatcmpl-fault",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(content) // 4 + 8,
                    "completion_tokens": out_tokens,
                    "total_tokens": len(content) // 4 + 8 + out_tokens,
                    **({"completion_tokens_details": details} if details else {}),
                },
            }
        )

    # Anthropic Message Batches

    async def ant_batch_create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, True)) is not None:
            return denied
        try:
            body = await _read_json(request)
        except ValueError:
            return _error(True, 400, "bad request body")
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            return _error(True, 400, "requests: List should have at least 1 item")
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not _CUSTOM_ID.fullmatch(cid):
                return _error(True, 400, f"requests.{i}.custom_id: String should match pattern "
                                         f"'^[a-zA-Z0-9_-]{{1,64}}$'")
            if not isinstance(r.get("params"), dict):
                return _error(True, 400, f"requests.{i}.params: Field required")
            if cid in seen:
                return _error(True, 400, f"requests: custom_id '{cid}' is used more than once; it must be unique "
                                         "within a batch")
            seen.add(cid)
        # params are validated as the batch runs, as Anthropic does: bad ones come back errored in the results
        now = time.time()
        bid = f"msgbatch_{secrets.token_hex(12)}"
        obj = {
            "id": bid,
            "type": "message_batch",
            "processing_status": "in_progress",
            "request_counts": {"processing": len(reqs), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
            "ended_at": None,
            "created_at": _rfc3339(now),
            "expires_at": _rfc3339(now + 86400),
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": None,
        }
        self.ant_batches[bid] = _Batch(obj, [(r["custom_id"], r["params"]) for r in reqs])
        self.counts.batches_created += 1
        return web.json_response(obj)

    def _ant_batch(self, request: web.Request) -> tuple[_Batch | None, web.Response | None]:
        if (denied := self._denied(request, True)) is not None:
            return None, denied
        bid = request.match_info["id"]
        if (b := self.ant_batches.get(bid)) is None:
            return None, _error(True, 404, f"message batch {bid} not found")
        return b, None

    async def ant_batch_get(self, request: web.Request) -> web.Response:
        b, refused = self._ant_batch(request)
        if b is None:
            return refused
        b.polls += 1
        self.counts.batch_polls[b.obj["id"]] += 1
        if b.obj["processing_status"] == "in_progress" and b.polls >= self.faults.batch_polls:
            self._end_ant(b, f"{request.scheme}://{request.host}")
        return web.json_response(b.obj)

    def _end_ant(self, b: _Batch, origin: str) -> None:
        """Runs the batch's requests once: results stored (shuffled), the succeeded ones billed."""
        f, rng = self.faults, self.batch_rng
        lines, n = [], Counter()
        for cid, params in b.requests:
            x, content, error = rng.random(), "", None
            if (why := _ant_invalid(params)) is not None:
                error = "invalid_request_error", why
            else:
                content = _ant_prompt(params)[0]
                if (marker := _marker(content)) is not None:
                    error = _ANT_ERRORS[marker[0]], marker[1]
                elif x < f.batch_p_errored:
                    error = "api_error", "Internal server error"
            if error is not None:
                result = {"type": "errored", "error": {"type": "error", "error": dict(zip(("type", "message"), error))}}
            elif x - f.batch_p_errored < f.batch_p_expired:
                result = {"type": "expired"}
            else:
                result = {"type": "succeeded", "message": json.loads(self._message(params))}
                self._bill(content, batch=True)
            n[result["type"]] += 1
            lines.append(json.dumps({"custom_id": cid, "result": result}) + "\n")
        rng.shuffle(lines)
        b.results = "".join(lines).encode()
        b.obj.update(
            processing_status="ended",
            request_counts={"processing": 0, "succeeded": n["succeeded"], "errored": n["errored"], "canceled": 0,
                            "expired": n["expired"]},
            ended_at=_rfc3339(time.time()),
            results_url=f"{origin}/v1/messages/batches/{b.obj['id']}/results",
        )

    async def ant_batch_results(self, request: web.Request) -> web.StreamResponse:
        b, refused = self._ant_batch(request)
        if b is None:
            return refused
        if b.obj["processing_status"] != "ended":
            return _error(True, 404, f"results for message batch {b.obj['id']} are not available until it has "
                                     "ended")
        resp = web.StreamResponse(status=200, headers={"content-type": "application/x-jsonl"})
        await resp.prepare(request)
        step = 64 * 1024
        for i in range(0, len(b.results), step):
            await resp.write(b.results[i : i + step])
        await resp.write_eof()
        return resp

    # OpenAI Files + Batch

    def _new_file(self, data: bytes, filename: str, purpose: str) -> dict:
        obj = {"id": f"file-{secrets.token_hex(12)}", "object": "file", "bytes": len(data),
               "created_at": int(time.time()), "filename": filename, "purpose": purpose}
        self.files[obj["id"]] = (obj, data)
        return obj

    async def file_upload(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, False)) is not None:
            return denied
        fields: dict[str, bytes] = {}
        filename = "upload.jsonl"
        try:
            if not request.content_type.startswith("multipart/"):
                raise ValueError
            async for part in await request.multipart():  # read in parts: no 1 MiB cap as with request.post()
                if part.name:
                    fields[part.name] = bytes(await part.read())
                    if part.name == "file" and part.filename:
                        filename = part.filename
        except (ValueError, KeyError):  # not multipart, or no boundary
            return _error(False, 400, "expected a multipart/form-data body", "invalid_request_error")
        if fields.get("purpose") != b"batch":
            return _error(False, 400, "Invalid value for 'purpose': this server takes only 'batch'.",
                          "invalid_request_error")
        if "file" not in fields:
            return _error(False, 400, "Missing required parameter: 'file'.", "invalid_request_error")
        return web.json_response(self._new_file(fields["file"], filename, "batch"))

    def _file(self, request: web.Request) -> tuple[tuple[dict, bytes] | None, web.Response | None]:
        if (denied := self._denied(request, False)) is not None:
            return None, denied
        fid = request.match_info["id"]
        if (file := self.files.get(fid)) is None:
            return None, _error(False, 404, f"No such File object: {fid}", "invalid_request_error")
        return file, None

    async def file_get(self, request: web.Request) -> web.Response:
        file, refused = self._file(request)
        return refused if file is None else web.json_response(file[0])

    async def file_content(self, request: web.Request) -> web.Response:
        file, refused = self._file(request)
        return refused if file is None else web.Response(body=file[1], content_type="application/octet-stream")

    async def oai_batch_create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, False)) is not None:
            return denied
        try:
            body = await _read_json(request)
        except ValueError:
            return _error(False, 400, "bad request body", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(False, 400, "bad request body", "invalid_request_error")
        for k in ("input_file_id", "endpoint", "completion_window"):
            if k not in body:
                return _error(False, 400, f"Missing required parameter: '{k}'.", "invalid_request_error")
        if body["endpoint"] != _CHAT_URL:
            return _error(False, 400, f"Invalid value for 'endpoint': this server batches only {_CHAT_URL}.",
                          "invalid_request_error")
        if body["completion_window"] != "24h":
            return _error(False, 400, "Invalid value for 'completion_window': only '24h' is supported.",
                          "invalid_request_error")
        fid = body["input_file_id"]
        if (file := self.files.get(fid)) is None:
            return _error(False, 404, f"No such File object: {fid}", "invalid_request_error")
        if file[0]["purpose"] != "batch":
            return _error(False, 400, f"File {fid} has purpose '{file[0]['purpose']}', not 'batch'.",
                          "invalid_request_error")
        requests, errors, seen = [], [], set()
        lines = [(i, s) for i, s in enumerate(file[1].decode(errors="replace").splitlines(), 1) if s.strip()]
        for i, s in lines:
            try:
                line = json.loads(s)
                if not isinstance(line, dict):
                    raise ValueError
            except ValueError:
                errors.append(("invalid_json_line", "This line is not parseable as valid JSON.", i))
                continue
            cid = line.get("custom_id")
            if not isinstance(cid, str) or not isinstance(line.get("body"), dict):
                errors.append(("missing_required_parameter", "Each line needs a string 'custom_id' and an object "
                               "'body'.", i))
            elif line.get("method") != "POST":
                errors.append(("invalid_method", "Invalid value for 'method': only 'POST' is supported.", i))
            elif line.get("url") != body["endpoint"]:
                errors.append(("invalid_url", "The URL provided for this request does not match the batch "
                               "endpoint.", i))
            elif cid in seen:
                errors.append(("duplicate_custom_id", "The custom_id for this request is a duplicate of another "
                               "request. The custom_id parameter must be unique for each individual request in a "
                               "batch.", i))
            else:
                seen.add(cid)
                requests.append((cid, line["body"]))
        if not lines:
            errors.append(("empty_file", "The batch input file is empty.", None))
        now = int(time.time())
        bid = f"batch_{secrets.token_hex(12)}"
        obj = {
            "id": bid,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": fid,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        errs = [{"code": code, "message": msg, "param": None, "line": i} for code, msg, i in errors]
        self.oai_batches[bid] = _Batch(obj, requests, errs)
        self.counts.batches_created += 1
        return web.json_response(obj)

    async def oai_batch_get(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request, False)) is not None:
            return denied
        bid = request.match_info["id"]
        if (b := self.oai_batches.get(bid)) is None:
            return _error(False, 404, f"No batch found with id '{bid}'.", "invalid_request_error")
        b.polls += 1
        self.counts.batch_polls[bid] += 1
        if b.obj["status"] in ("validating", "in_progress"):
            now = int(time.time())
            if b.errors:  # a bad input file fails the whole batch, as OpenAI does
                b.obj.update(status="failed", failed_at=now, errors={"object": "list", "data": b.errors})
            elif b.polls >= self.faults.batch_polls:
                self._end_oai(b, now)
            else:
                b.obj.update(status="in_progress", in_progress_at=b.obj["in_progress_at"] or now)
        return web.json_response(b.obj)

    def _end_oai(self, b: _Batch, now: int) -> None:
        """Runs the batch's requests once: output and error files stored (shuffled), the completed ones billed."""
        f, rng = self.faults, self.batch_rng
        out, err = [], []
        for cid, body in b.requests:
            x = rng.random()
            entry = {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": cid}
            rid = f"req_{secrets.token_hex(12)}"
            try:
                content = "\n".join(m["content"] for m in body["messages"])
                reject = self._chat_reject(body, content)
            except (KeyError, TypeError):
                reject = 400, "bad request body", None
            if reject is None and x < f.batch_p_errored:
                reject = 500, "server error", None
            if reject is not None:
                status, msg, etype = reject
                etype = etype or ("invalid_request_error" if status == 400 else "server_error")
                err.append({**entry, "response": {"status_code": status, "request_id": rid,
                                                  "body": {"error": {"message": msg, "type": etype}}}, "error": None})
            elif x - f.batch_p_errored < f.batch_p_expired:
                err.append({**entry, "response": None, "error": {"code": "batch_expired", "message": _EXPIRED}})
            else:
                out.append({**entry, "response": {"status_code": 200, "request_id": rid,
                                                  "body": json.loads(self._chat_payload(body, content))},
                            "error": None})
                self._bill(content, batch=True)
        bid = b.obj["id"]
        files = {}
        for kind, rows in (("output", out), ("error", err)):
            rng.shuffle(rows)
            if rows:  # as OpenAI: no file when there is nothing to put in it
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                files[f"{kind}_file_id"] = self._new_file(data, f"{bid}_{kind}.jsonl", "batch_output")["id"]
        b.obj.update(status="completed", in_progress_at=b.obj["in_progress_at"] or now, finalizing_at=now,
                     completed_at=now, request_counts={"total": len(b.requests), "completed": len(out),
                                                       "failed": len(err)}, **files)


class FaultServer:
    """Runs a FaultApp on 127.0.0.1 in a background thread with its own event loop."""

    def __init__(self, faults: Faults | None = None, port: int = 0) -> None:
        self.fa = FaultApp(faults)
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        """The base URL without /v1 (Anthropic clients add it themselves)."""
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.fa.app(), access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> FaultServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reset(self, **kw) -> None:
        self._loop.call_soon_threadsafe(lambda: self.fa.reset(**kw))
        time.sleep(0.05)

    def stats(self) -> dict:
        return self.fa.stats()

    def judge_config(self, path, key_env: str = "CAI_TEST_JUDGE_KEY"):
        """A judge YAML at `path` with this server as its one endpoint, priced so the ledger has $ to add."""
        import yaml

        path.write_text(yaml.safe_dump({"model": "judge-m", "endpoints": [{
            "name": "fault", "base_url": self.url, "api_key_env": key_env, "rpm": 6000, "max_concurrent": 8,
            "usd_per_m_in": 1.0, "usd_per_m_out": 4.0}]}))
        return path

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--faults", default="{}", help="JSON of Faults fields")
    a = ap.parse_args()
    fa = FaultApp(Faults(**json.loads(a.faults)))

    async def run():
        runner = web.AppRunner(fa.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", a.port)
        await site.start()
        print(f"READY {site._server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
