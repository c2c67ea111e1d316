"""HTTP side of the farm: an endpoint pool over httpx.AsyncClient with the one retry layer.

Transient errors (429, 5xx, timeouts, connection errors, 200s whose body does not parse) are retried with
exponential backoff and full jitter until the item's deadline, honouring Retry-After (and OpenAI's
x-ratelimit-reset-* / retry-after-ms, Anthropic's anthropic-ratelimit-*-reset) with waits in [1.0, 1.1] x
what was asked. A 429 also slows its endpoint down (judge.limits.SpacedLimiter).

What cannot work fails fast: 401/403/404 drop the endpoint from the pool at once, and so do connections that
keep failing (`retry.down_after_s`); with no endpoint left every request raises NoEndpoint and the farm
stops. Other 4xx fail their item with the reason (a 400 naming a parameter only the reading path uses
raises PathUnsupported: the farm switches to sampling).

Billing follows the provider: a 200 is billed with the `usage` it reports, or, without usage, with the
judge's tokenizer and marked estimated; failed attempts cost nothing and are counted by status.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp
import httpx

from cai_bootstrap.core.console import console
from cai_bootstrap.core.reading import reply_text
from cai_bootstrap.judge.cache import ChatRequest
from cai_bootstrap.judge.config import Endpoint, JudgeConfig
from cai_bootstrap.judge.limits import Budget, SpacedLimiter, TokenBucket
from cai_bootstrap.judge.providers import PROVIDERS, Usage

DROP_AT_ONCE = {401: "the key is refused", 403: "access is denied", 404: "not found (base_url or model)"}


class ItemFailed(Exception):
    """The request cannot succeed; `reason` is short and goes to the output row (never a key). `billed` is what
    its failed attempts cost all the same (200s whose body did not parse), for the ledger."""

    def __init__(self, reason: str, billed: Billed | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.billed = billed


class NoEndpoint(ItemFailed):
    """Every endpoint of the pool was dropped (refused connections, 401/403/404): nothing can be judged."""


class PathUnsupported(ItemFailed):
    """A 400 that names a parameter only one way of reading numbers uses (logprobs, top_logprobs, max_tokens,
    temperature): the judge is a reasoning model or similar, to be read by sampling instead."""


# what reasoning models' 400s say (OpenAI: "logprobs are not supported with reasoning models", "Unsupported
# parameter: 'max_tokens' ... Use 'max_completion_tokens' instead", "'temperature' does not support 0.0"): a
# parameter the path uses AND that it is unsupported, so "max_tokens is too large" (a long prompt) is no switch
_PATH_PARAMS = re.compile(r"\b(top_logprobs|logprobs|max_tokens|temperature|top_p)\b")
_UNSUPPORTED = re.compile(r"not supported|unsupported|does not support", re.I)


@dataclass
class Billed:
    """What a request's attempts were billed: tokens and $, and whether any of it is our count, not the
    provider's (a 200 without `usage`, or one whose body did not parse)."""

    tokens_in: int = 0
    tokens_out: int = 0
    usd: float = 0.0
    estimated: bool = False
    notes: list[str] = field(default_factory=list)  # for the ledger's `note`: timeouts booked, overruns

    def add(self, tin: int, tout: int, usd: float, estimated: bool, note: str | None = None) -> None:
        self.tokens_in, self.tokens_out, self.usd = self.tokens_in + tin, self.tokens_out + tout, self.usd + usd
        self.estimated = self.estimated or estimated
        if note:
            self.notes.append(note)

    @property
    def note(self) -> str | None:
        return "; ".join(self.notes)[:300] if self.notes else None


@dataclass
class Stats:
    sent: int = 0
    ok: int = 0
    r429: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)  # failed attempts by status: "http 500", "timeout", ...
    estimated: int = 0  # 200s billed by our own token count (no usage reported, or a body that did not parse)
    tokens_in: int = 0
    tokens_out: int = 0
    # (asked, waited) for the last Retry-After waits: tests check waited <= 1.1 x asked
    ra_waits: deque = field(default_factory=lambda: deque(maxlen=1000))


TIMEOUT_NOTE = "timeout: booked at its reservation (the provider may have billed it)"


@dataclass
class Reply:
    body: dict
    endpoint: str
    tokens_in: int
    tokens_out: int
    usd: float
    attempts: int
    estimated: bool = False
    note: str | None = None


class EndpointState:
    def __init__(self, ep: Endpoint, cfg: JudgeConfig) -> None:
        self.ep = ep
        self.api = PROVIDERS[ep.provider]
        self.limiter = SpacedLimiter(ep.rpm, cfg.retry.slowdown_factor, cfg.retry.recover_s)
        self.tokens = TokenBucket(ep.tpm)
        self.sem = asyncio.Semaphore(ep.max_concurrent)
        self.in_flight = 0
        self.url = ep.base_url.rstrip("/") + self.api.path
        self.down: str | None = None  # why it was dropped from the pool
        self.conn_fails, self.conn_fail_since = 0, 0.0  # connection failures since the last answer

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
    ] + [_until(v) for h, v in headers.items() if h.startswith("anthropic-ratelimit-") and h.endswith("-reset")]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


def _until(stamp: str) -> float | None:
    """Seconds from now to an RFC 3339 time (Anthropic's rate-limit resets)."""
    try:
        return max(0.0, datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - time.time())
    except ValueError:
        return None


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
    """Spreads requests over the live endpoints by free capacity; owns the HTTP client and the retry loop."""

    def __init__(self, cfg: JudgeConfig, endpoints: list[Endpoint], budget: Budget,
                 count_tokens: Callable[[str], int] | None = None) -> None:
        self.cfg = cfg
        self.states = [EndpointState(e, cfg) for e in endpoints]
        self.budget = budget
        self.stats = Stats()
        self._count_tokens = count_tokens  # for 200s without usage; loaded on the first one when None
        self._dropped = asyncio.Event()  # set when an endpoint is dropped: requests backing off re-pick at once
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

    # ---------------------------------------------------------------- the pool
    @property
    def dropped(self) -> dict[str, str]:
        return {s.ep.name: s.down for s in self.states if s.down}

    def _drop(self, st: EndpointState, why: str) -> None:
        if st.down is None:
            st.down = why
            self._dropped.set()
            self._dropped = asyncio.Event()
            console.print(f"[yellow]judge endpoint {st.ep.name} ({st.ep.base_url}) dropped: {why}[/]",
                          soft_wrap=True)

    async def _wait(self, seconds: float) -> None:
        """Sleep, cut short when an endpoint is dropped (the waiting request then picks again at once)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # no extra task per waiter, unlike wait_for
                await self._dropped.wait()

    def _pick(self, req: ChatRequest) -> EndpointState:
        live = [s for s in self.states if s.down is None]
        if not live:
            raise NoEndpoint("no endpoint left: " + "; ".join(f"{n} {w}" for n, w in self.dropped.items()))
        ok = [s for s in live if s.ep.logprobs or not req.logprobs]
        if not ok:
            raise ItemFailed("no endpoint returns logprobs, which this scorer needs")
        # free capacity: soonest send slot, then fewest in flight relative to the endpoint's concurrency
        return min(ok, key=lambda s: (round(s.limiter.earliest(), 3), s.in_flight / s.ep.max_concurrent))

    def worst_usd(self, req: ChatRequest) -> float:
        return max(s.worst_usd(req) for s in self.states)

    # ---------------------------------------------------------------- one request, retried
    async def send(self, req: ChatRequest, deadline: float) -> Reply:
        """The reply, after retrying what is transient until `deadline`; raises ItemFailed (with what its
        attempts were billed) when the request cannot succeed, NoEndpoint when no endpoint is left."""
        r, billed = self.cfg.retry, Billed()
        reason = "no attempt"
        for attempt in range(1, r.max_attempts + 1):
            if attempt > 1:
                self.stats.retries += 1
            try:
                st = self._pick(req)
                outcome, reason = await self._attempt(st, req, deadline, billed)
            except ItemFailed as e:
                e.billed = billed if billed.usd or billed.tokens_in else None
                raise
            if isinstance(outcome, Reply):
                outcome.attempts = attempt
                return outcome
            delay = (outcome if outcome is not None
                     else random.uniform(0, min(r.backoff_cap_s, r.backoff_base_s * 2 ** (attempt - 1))))
            if st.down is not None:  # no need to wait for it: pick another endpoint (or learn none is left) now
                delay = 0.0
            if time.monotonic() + delay > deadline:
                raise ItemFailed(f"deadline: {reason} and the next try would pass the {r.deadline_s:g}s deadline",
                                 billed if billed.usd else None)
            await self._wait(delay)
        raise ItemFailed(f"attempts: {r.max_attempts} attempts, last error {reason}", billed if billed.usd else None)

    async def _attempt(self, st: EndpointState, req: ChatRequest, deadline: float, billed: Billed):
        """One try. Returns (Reply, None) on success, or (seconds to wait or None for backoff, reason)."""
        ep, r = st.ep, self.cfg.retry
        est_tokens = req.prompt_bytes() + req.max_out
        worst = st.worst_usd(req)
        async with st.sem:
            if st.down is not None:  # dropped while this request waited for a free connection
                return 0.0, f"endpoint {ep.name} dropped"
            at = st.limiter.reserve()
            if at > deadline:
                raise ItemFailed("deadline: no send slot before the item's deadline")
            if (d := at - time.monotonic()) > 0:
                await self._wait(d)
            if (d := st.limiter.pause_until - time.monotonic()) > 0 and st.down is None:  # a 429 came meanwhile
                await self._wait(d)
            if st.down is not None:  # dropped while this request waited for its slot
                return 0.0, f"endpoint {ep.name} dropped"
            await st.tokens.acquire(est_tokens)
            try:
                await self.budget.reserve(worst)  # raises BudgetExceeded: the farm stops cleanly
            except BaseException:
                st.tokens.settle(est_tokens, 0)
                raise
            key = None
            if ep.api_key_env:
                key = ep.api_key()  # read now, used once, never stored
                if not key:
                    self.budget.settle(worst, 0.0)
                    st.tokens.settle(est_tokens, 0)
                    raise ItemFailed(f"endpoint {ep.name}: environment variable {ep.api_key_env} is not set")
            headers = {"content-type": "application/json", **st.api.headers(key)}
            del key
            st.in_flight += 1
            self.stats.sent += 1
            try:
                async with asyncio.timeout(min(r.request_timeout_s, max(0.01, deadline - time.monotonic()))):
                    resp = await self.client.post(st.url, json=st.api.body(req, ep.model or self.cfg.model),
                                                  headers=headers)
            except BaseException as e:
                return self._no_answer(st, e, req, worst, est_tokens, billed)
            finally:
                st.in_flight -= 1
                headers.clear()
        return self._handle(st, req, resp, worst, est_tokens, billed)

    def _no_answer(self, st: EndpointState, e: BaseException, req: ChatRequest, worst: float, est_tokens: int,
                   billed: Billed) -> tuple[None, str]:
        """No reply. A request that was sent and timed out may have been billed (the provider did the work):
        booked at its reservation, marked estimated. One that never connected costs nothing."""
        # httpx-aiohttp maps every aiohttp connection error to httpx.ConnectTimeout: judge by the cause
        cause = e.__cause__ if isinstance(e.__cause__, aiohttp.ClientError) else e
        if isinstance(cause, TimeoutError | httpx.TimeoutException) and not _is_connect(cause):
            self._settle(st, worst, worst, est_tokens, est_tokens, estimated=True)
            billed.add(req.prompt_bytes(), req.max_out, worst, True, TIMEOUT_NOTE)
            self.stats.errors["timeout"] += 1
            return None, "timeout"
        self.budget.settle(worst, 0.0)
        st.tokens.settle(est_tokens, 0)
        if isinstance(cause, httpx.TransportError | OSError | aiohttp.ClientError):
            self.stats.errors["connection"] += 1
            why = f"connection error ({type(cause).__name__})"
            now = time.monotonic()
            if st.conn_fails == 0:
                st.conn_fail_since = now
            st.conn_fails += 1
            r = self.cfg.retry
            if st.conn_fails >= r.down_after and now - st.conn_fail_since >= r.down_after_s:
                self._drop(st, f"{why}, {st.conn_fails} times over {now - st.conn_fail_since:.0f}s")
            return None, why
        raise e

    def _ra_wait(self, ra: float | None) -> float | None:
        """Jittered wait in [1.0, 1.1] x Retry-After (never sooner than asked, never over 1.1x)."""
        if ra is None:
            return None
        w = random.uniform(ra, 1.1 * ra)
        self.stats.ra_waits.append((ra, w))
        return w

    def _handle(self, st: EndpointState, req: ChatRequest, resp: httpx.Response, worst: float, est_tokens: int,
                billed: Billed):
        code = resp.status_code
        st.conn_fails = 0  # it answered
        if code == 200:
            return self._billed_reply(st, req, resp, worst, est_tokens, billed)
        self.budget.settle(worst, 0.0)  # an error is not billed
        st.tokens.settle(est_tokens, 0)
        self.stats.errors[f"http {code}"] += 1
        if code == 429:
            self.stats.r429 += 1
            ra = parse_retry_after(resp.headers)
            st.limiter.slowdown(ra)
            return self._ra_wait(ra), "429 rate limited"
        if code >= 500:
            return self._ra_wait(parse_retry_after(resp.headers)), f"http {code}"
        snippet = _safe_snippet(resp)
        if code in DROP_AT_ONCE:
            self._drop(st, f"http {code}, {DROP_AT_ONCE[code]}: {snippet}")
            return 0.0, f"http {code} from {st.ep.name}"
        if code == 400 and _PATH_PARAMS.search(snippet) and _UNSUPPORTED.search(snippet):
            raise PathUnsupported(f"http 400 from {st.ep.name}: {snippet}")
        raise ItemFailed(f"http {code} from {st.ep.name}: {snippet}")

    def _billed_reply(self, st: EndpointState, req: ChatRequest, resp: httpx.Response, worst: float,
                      est_tokens: int, billed: Billed):
        """A 200: billed with the usage the provider reports, else with our own token count (estimated). A body
        that does not parse was billed all the same: booked at our count of the prompt and the output cap,
        and retried."""
        try:
            body, usage = st.api.reply(resp.json())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            tin = self._count(_prompt_text(req))
            usd = st.usd(tin, req.max_out)
            self._settle(st, worst, usd, est_tokens, tin + req.max_out, estimated=True)
            billed.add(tin, req.max_out, usd, True)
            self.stats.errors["malformed"] += 1
            return None, f"malformed response from {st.ep.name}: body does not parse"
        estimated = usage is None
        if usage is None:
            usage = Usage(self._count(_prompt_text(req)), self._count(reply_text(body) or ""))
        usd = st.usd(usage.tokens_in, usage.tokens_out)
        # booked as reported even past the reservation; the budget then sends nothing more under a cap
        over = f"overrun: ${usd - worst:.6f} reported past the ${worst:.6f} reserved" if usd > worst + 1e-12 else None
        self._settle(st, worst, usd, est_tokens, usage.tokens_in + usage.tokens_out, estimated)
        billed.add(usage.tokens_in, usage.tokens_out, usd, estimated, over)
        self.stats.ok += 1
        self.stats.tokens_in += usage.tokens_in
        self.stats.tokens_out += usage.tokens_out
        return Reply(body, st.ep.name, billed.tokens_in, billed.tokens_out, billed.usd, 0, billed.estimated,
                     billed.note), None

    def _settle(self, st: EndpointState, worst: float, usd: float, est_tokens: int, used: int,
                estimated: bool) -> None:
        self.budget.settle(worst, usd)
        st.tokens.settle(est_tokens, used)
        self.stats.estimated += estimated

    def _count(self, text: str) -> int:
        if self._count_tokens is None:
            self._count_tokens = token_counter(self.cfg)
        return self._count_tokens(text)


def token_counter(cfg: JudgeConfig) -> Callable[[str], int]:
    """Counts tokens for replies that report no usage: the judge's own tokenizer where it can be seen (the
    embedded server's model, or the config's `tokenizer`), else UTF-8 bytes / 4 (either way the ledger row
    is marked estimated)."""
    from cai_bootstrap.judge.endpoints import judge_tokenizer

    tok = judge_tokenizer(cfg)
    if tok is not None:
        return lambda text: len(tok.encode(text, add_special_tokens=False))
    return lambda text: math.ceil(len(text.encode()) / 4)


def _prompt_text(req: ChatRequest) -> str:
    return "\n".join(m.get("content", "") for m in req.messages) + (req.prefill or "")


def _is_connect(e: BaseException) -> bool:
    """A connection that could not be opened (refused, unreachable, or timing out while connecting), as
    against a request that was sent and not answered in time."""
    return isinstance(e, httpx.ConnectTimeout | httpx.ConnectError | aiohttp.ClientConnectorError
                      | aiohttp.ConnectionTimeoutError)


def _safe_snippet(resp: httpx.Response) -> str:
    try:
        msg = resp.json().get("error", {})
        msg = msg.get("message", "") if isinstance(msg, dict) else str(msg)
    except (ValueError, AttributeError):
        msg = resp.text
    # an auth error may echo the key back: scrub anything key-shaped
    return re.sub(r"(sk|Bearer)[-_ ]?[A-Za-z0-9_\-]{8,}", "[redacted]", msg)[:160]
