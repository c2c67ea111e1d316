"""HTTP side of the farm: an endpoint pool over httpx.AsyncClient with the one retry layer.

Retries 429, 5xx, timeouts and connection errors with exponential backoff and full jitter, honouring
Retry-After (and OpenAI's x-ratelimit-reset-* / retry-after-ms) with waits in [1.0, 1.1] x what was asked.
A 429 also slows its endpoint down (judge.limits.SpacedLimiter). 400/401/403/404/422 and bodies that do
not parse fail the item at once with the reason. Each request has a deadline (attempts and wall time),
and the same 5xx status `same_5xx_limit` times fails it.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import aiohttp
import httpx

from judge.cache import ChatRequest
from judge.config import Endpoint, JudgeConfig
from judge.limits import Budget, SpacedLimiter, TokenBucket

NON_RETRYABLE = {400, 401, 403, 404, 405, 413, 422}


class ItemFailed(Exception):
    """The request cannot succeed; `reason` is short and goes to the output row (never a key)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PathUnsupported(ItemFailed):
    """A 400 that names a parameter only one way of reading numbers uses (logprobs, top_logprobs, max_tokens,
    temperature): the judge is a reasoning model or similar, to be read by sampling instead."""


# what reasoning models' 400s say (OpenAI: "logprobs are not supported with reasoning models", "Unsupported
# parameter: 'max_tokens' ... Use 'max_completion_tokens' instead", "'temperature' does not support 0.0"): a
# parameter the path uses AND that it is unsupported, so "max_tokens is too large" (a long prompt) is no switch
_PATH_PARAMS = re.compile(r"\b(top_logprobs|logprobs|max_tokens|temperature|top_p)\b")
_UNSUPPORTED = re.compile(r"not supported|unsupported|does not support", re.I)


@dataclass
class Stats:
    sent: int = 0
    ok: int = 0
    r429: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)
    tokens_in: int = 0
    tokens_out: int = 0
    # (asked, waited) for the last Retry-After waits: tests check waited <= 1.1 x asked
    ra_waits: deque = field(default_factory=lambda: deque(maxlen=1000))


@dataclass
class Reply:
    body: dict
    endpoint: str
    tokens_in: int
    tokens_out: int
    usd: float
    attempts: int


class EndpointState:
    def __init__(self, ep: Endpoint, cfg: JudgeConfig) -> None:
        self.ep = ep
        self.limiter = SpacedLimiter(ep.rpm, cfg.retry.slowdown_factor, cfg.retry.recover_s)
        self.tokens = TokenBucket(ep.tpm)
        self.sem = asyncio.Semaphore(ep.max_concurrent)
        self.in_flight = 0
        self.url = ep.base_url.rstrip("/") + "/chat/completions"

    def worst_usd(self, req: ChatRequest) -> float:
        return (req.prompt_bytes() * self.ep.usd_per_m_in + req.max_out * self.ep.usd_per_m_out) / 1e6

    def usd(self, tin: int, tout: int) -> float:
        return (tin * self.ep.usd_per_m_in + tout * self.ep.usd_per_m_out) / 1e6


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds asked to wait: Retry-After (seconds or HTTP date), retry-after-ms, x-ratelimit-reset-*."""
    if (v := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(v) / 1000)
        except ValueError:
            pass
    if (v := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(v))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(v).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    resets = [
        _duration(headers[h])
        for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if h in headers
    ]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


def _duration(s: str) -> float | None:
    """OpenAI style '1s', '6m0s', '20ms', or plain seconds."""
    try:
        return float(s)
    except ValueError:
        pass
    total, found = 0.0, False
    for num, unit in re.findall(r"([\d.]+)(ms|h|m|s)", s):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        found = True
    return total if found else None


class Pool:
    """Spreads requests over the endpoints by free capacity; owns the HTTP client and the retry loop."""

    def __init__(self, cfg: JudgeConfig, endpoints: list[Endpoint], budget: Budget) -> None:
        self.cfg = cfg
        self.states = [EndpointState(e, cfg) for e in endpoints]
        self.budget = budget
        self.stats = Stats()
        r = cfg.retry
        conns = sum(e.max_concurrent for e in endpoints) + 8
        limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
        transport = None
        if cfg.transport == "aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits, trust_env=False)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(r.request_timeout_s, connect=r.connect_timeout_s),
            limits=limits,
            trust_env=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _pick(self, req: ChatRequest) -> EndpointState:
        ok = [s for s in self.states if s.ep.logprobs or not req.logprobs]
        if not ok:
            raise ItemFailed("no endpoint returns logprobs, which this scorer needs")
        # free capacity: soonest send slot, then fewest in flight relative to the endpoint's concurrency
        return min(ok, key=lambda s: (round(s.limiter.earliest(), 3), s.in_flight / s.ep.max_concurrent))

    def worst_usd(self, req: ChatRequest) -> float:
        return max(s.worst_usd(req) for s in self.states)

    async def send(self, req: ChatRequest, deadline: float) -> Reply:
        r = self.cfg.retry
        same_5xx: Counter = Counter()
        for attempt in range(1, r.max_attempts + 1):
            if attempt > 1:
                self.stats.retries += 1
            st = self._pick(req)
            wait_for, reason = await self._attempt(st, req, deadline, same_5xx)
            if isinstance(wait_for, Reply):
                wait_for.attempts = attempt
                return wait_for
            delay = (
                wait_for
                if wait_for is not None
                else random.uniform(0, min(r.backoff_cap_s, r.backoff_base_s * 2 ** (attempt - 1)))
            )
            if time.monotonic() + delay > deadline:
                raise ItemFailed(
                    f"deadline: {reason} and the next try would pass the {r.deadline_s:g}s deadline"
                )
            await asyncio.sleep(delay)
        raise ItemFailed(f"attempts: {r.max_attempts} attempts, last error {reason}")

    async def _attempt(self, st: EndpointState, req: ChatRequest, deadline: float, same_5xx: Counter):
        """One try. Returns (Reply, None) on success, or (seconds to wait or None for backoff, reason)."""
        ep, r = st.ep, self.cfg.retry
        est_tokens = req.prompt_bytes() + req.max_out
        worst = st.worst_usd(req)
        async with st.sem:
            at = st.limiter.reserve()
            if at > deadline:
                raise ItemFailed("deadline: no send slot before the item's deadline")
            if (d := at - time.monotonic()) > 0:
                await asyncio.sleep(d)
            if (d := st.limiter.pause_until - time.monotonic()) > 0:  # a 429 arrived while we waited
                await asyncio.sleep(d)
            await st.tokens.acquire(est_tokens)
            try:
                await self.budget.reserve(worst)  # raises BudgetExceeded: the farm stops cleanly
            except BaseException:
                st.tokens.settle(est_tokens, 0)
                raise
            headers = {"content-type": "application/json"}
            if ep.api_key_env:
                key = ep.api_key()  # read now, used once, never stored
                if not key:
                    self.budget.settle(worst, 0.0)
                    st.tokens.settle(est_tokens, 0)
                    raise ItemFailed(f"endpoint {ep.name}: environment variable {ep.api_key_env} is not set")
                headers["authorization"] = f"Bearer {key}"
                del key
            st.in_flight += 1
            self.stats.sent += 1
            try:
                async with asyncio.timeout(min(r.request_timeout_s, max(0.01, deadline - time.monotonic()))):
                    resp = await self.client.post(
                        st.url, json=req.body(ep.model or self.cfg.model), headers=headers
                    )
            except BaseException as e:
                # no answer: the reservation goes back (a provider that bills a request it never answered
                # is outside what a client can see)
                self.budget.settle(worst, 0.0)
                st.tokens.settle(est_tokens, 0)
                # httpx-aiohttp maps every aiohttp connection error to httpx.ConnectTimeout: judge by the cause
                cause = e.__cause__ if isinstance(e.__cause__, aiohttp.ClientError) else e
                if isinstance(cause, TimeoutError | httpx.TimeoutException):
                    self.stats.errors["timeout"] += 1
                    return None, "timeout"
                if isinstance(cause, httpx.TransportError | OSError | aiohttp.ClientError):
                    self.stats.errors["connection"] += 1
                    return None, f"connection error ({type(cause).__name__})"
                raise
            finally:
                st.in_flight -= 1
                headers.clear()
        return self._handle(st, resp, worst, est_tokens, same_5xx)

    def _ra_wait(self, ra: float | None) -> float | None:
        """Jittered wait in [1.0, 1.1] x Retry-After (never sooner than asked, never over 1.1x)."""
        if ra is None:
            return None
        w = random.uniform(ra, 1.1 * ra)
        self.stats.ra_waits.append((ra, w))
        return w

    def _handle(self, st: EndpointState, resp: httpx.Response, worst: float, est_tokens: int, same_5xx):
        code = resp.status_code
        if code != 200:
            self.budget.settle(worst, 0.0)
            st.tokens.settle(est_tokens, 0)
        if code == 200:
            try:
                body = resp.json()
                usage = body.get("usage") or {}
                tin, tout = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
                body["choices"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                # it may have been billed and we cannot read the usage: book the worst case, fail the item
                self.budget.settle(worst, worst)
                st.tokens.settle(est_tokens, est_tokens)
                self.stats.errors["malformed"] += 1
                raise ItemFailed(f"malformed response from {st.ep.name}: body does not parse") from None
            usd = st.usd(tin, tout) if usage else worst  # no usage reported: assume the worst case
            self.budget.settle(worst, usd)
            st.tokens.settle(est_tokens, tin + tout if usage else est_tokens)
            self.stats.ok += 1
            self.stats.tokens_in += tin
            self.stats.tokens_out += tout
            return Reply(body, st.ep.name, tin, tout, usd, 0), None
        if code == 429:
            self.stats.r429 += 1
            ra = parse_retry_after(resp.headers)
            st.limiter.slowdown(ra)
            return self._ra_wait(ra), "429 rate limited"
        if code >= 500:
            self.stats.errors[f"http {code}"] += 1
            same_5xx[code] += 1
            if same_5xx[code] >= self.cfg.retry.same_5xx_limit:
                raise ItemFailed(f"http {code} {same_5xx[code]} times")
            ra = parse_retry_after(resp.headers)
            return self._ra_wait(ra), f"http {code}"
        self.stats.errors[f"http {code}"] += 1
        snippet = _safe_snippet(resp)
        if code == 400 and _PATH_PARAMS.search(snippet) and _UNSUPPORTED.search(snippet):
            raise PathUnsupported(f"http 400 from {st.ep.name}: {snippet}")
        raise ItemFailed(f"http {code} from {st.ep.name}: {snippet}")


def _safe_snippet(resp: httpx.Response) -> str:
    try:
        msg = resp.json().get("error", {})
        msg = msg.get("message", "") if isinstance(msg, dict) else str(msg)
    except (ValueError, AttributeError):
        msg = resp.text
    # an auth error may echo the key back: scrub anything key-shaped
    return re.sub(r"(sk|Bearer)[-_ ]?[A-Za-z0-9_\-]{8,}", "[redacted]", msg)[:160]
