"""A fault-injecting OpenAI-compatible chat-completions server (aiohttp, 127.0.0.1) for judge tests/bench.

It enforces a sliding-window request limit (429 + Retry-After beyond it), injects 5xx, timeouts (hangs,
then 504, never billed), slow bodies (trickled, billed once fully sent), malformed JSON (200, billed), and
counts every request. "Billed" means a 200 whose body was fully written, counted per prompt content so a
test can check that no item was paid twice. Content markers force faults per item: ALWAYS500, ALWAYS400.

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
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Faults:
    limit: int = 10_000  # requests per window (sliding)
    window_s: float = 60.0
    latency: tuple[float, float] = (0.0, 0.0)
    p_500: float = 0.0
    p_503: float = 0.0
    p_timeout: float = 0.0
    hang_s: float = 30.0
    p_slow: float = 0.0
    slow_s: float = 0.5
    p_malformed: float = 0.0
    p_429: float = 0.0  # extra random 429s (provider-side storms), with Retry-After
    retry_after_s: float | None = None  # fixed Retry-After for random 429s (None: 1 s)
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <api_key>`
    seed: int = 0
    # a reasoning model (GPT-5, o-series): 400s for logprobs, max_tokens and a temperature other than 1, as
    # OpenAI words them; text replies ending with a number, reasoning tokens billed as output
    reasoning: bool = False
    p_unparsable: float = 0.0  # reasoning replies with no number in them


@dataclass
class Counts:
    requests: int = 0
    status: Counter = field(default_factory=Counter)
    billed: Counter = field(default_factory=Counter)  # prompt hash -> fully delivered 200s
    r429_limit: int = 0  # 429s caused by exceeding the limit (self-caused by the client)
    r429_random: int = 0
    starts: list = field(default_factory=list)  # arrival times (monotonic), for achieved-rate figures
    max_concurrent: int = 0
    in_flight: int = 0


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


class FaultApp:
    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.counts = Counts()
        self.window: deque[float] = deque()
        self.rng = random.Random(self.faults.seed)

    def reset(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self.faults, k, v)
        self.counts = Counts()
        self.window.clear()
        self.rng = random.Random(self.faults.seed)

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
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
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

    async def chat(self, request: web.Request) -> web.StreamResponse:
        f, c = self.faults, self.counts
        c.requests += 1
        now = time.monotonic()
        c.starts.append(now)
        if f.api_key is not None and request.headers.get("authorization") != f"Bearer {f.api_key}":
            self._status(401)
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        while self.window and now - self.window[0] >= f.window_s:
            self.window.popleft()
        if len(self.window) >= f.limit:
            c.r429_limit += 1
            self._status(429)
            wait = f.window_s - (now - self.window[0])
            return web.json_response(
                {"error": {"message": "rate limit"}}, status=429, headers={"Retry-After": f"{wait:.3f}"}
            )
        self.window.append(now)
        try:
            body = await request.json()
            content = "\n".join(m["content"] for m in body["messages"])
        except (ValueError, KeyError, TypeError):
            self._status(400)
            return web.json_response({"error": {"message": "bad request body"}}, status=400)
        c.in_flight += 1
        c.max_concurrent = max(c.max_concurrent, c.in_flight)
        try:
            return await self._answer(request, body, content)
        finally:
            c.in_flight -= 1

    async def _answer(self, request, body, content) -> web.StreamResponse:
        f, c, rng = self.faults, self.counts, self.rng
        if f.reasoning and (refusal := _reasoning_400(body)):
            self._status(400)
            return web.json_response({"error": {"message": refusal, "type": "invalid_request_error"}}, status=400)
        if "TOOLONG400" in content:  # vLLM's answer to a prompt that leaves no room for max_tokens
            self._status(400)
            msg = "'max_tokens' or 'max_completion_tokens' is too large: 1. This model's maximum context length is 2048"
            return web.json_response({"error": {"message": msg}}, status=400)
        if "ALWAYS400" in content:
            self._status(400)
            return web.json_response({"error": {"message": "invalid request"}}, status=400)
        if "ALWAYS500" in content:
            self._status(500)
            return web.json_response({"error": {"message": "server error"}}, status=500)
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
            c.r429_random += 1
            self._status(429)
            ra = f.retry_after_s if f.retry_after_s is not None else 1.0
            return web.json_response(
                {"error": {"message": "overloaded"}}, status=429, headers={"Retry-After": f"{ra:g}"}
            )
        if kind in (500, 503):
            self._status(kind)
            return web.json_response({"error": {"message": "upstream error"}}, status=kind)
        if kind == "timeout":
            await asyncio.sleep(f.hang_s)
            self._status(504)
            return web.json_response({"error": {"message": "gateway timeout"}}, status=504)
        payload = (self._completion(body, content, True, f.p_unparsable) if f.reasoning
                   else self._completion(body, content))
        key = hashlib.sha256(content.encode()).hexdigest()
        if kind == "malformed":
            self._status(200)
            c.billed[key] += 1
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
        await resp.write_eof()
        self._status(200)
        c.billed[key] += 1  # delivered in full: the provider bills it
        return resp

    @staticmethod
    def _completion(body: dict, content: str, reasoning: bool = False, p_unparsable: float = 0.0) -> str:
        max_tokens = int(body.get("max_tokens") or 16)
        details = None
        if reasoning:
            h = int(hashlib.sha256(f"{content}|{body.get('seed')}".encode()).hexdigest(), 16)
            unparsable = (h % 1000) / 1000 < p_unparsable
            if "A or B" in content:  # a pairwise prompt: a letter, mostly A (shown first)
                text = "Neither is better." if unparsable else f"Answer {'A' if h % 4 else 'B'} is better."
            else:
                lo, hi = _scale(content)
                text = "I would rather not put a figure on that." if unparsable else f"Score: {lo + h % (hi - lo + 1)}"
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
