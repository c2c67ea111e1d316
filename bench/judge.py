"""Judge farm benchmark against the local fault-injecting server (a separate process). Prints one JSON object.

.venv/bin/python bench/judge.py [--seconds 20] [--stream-items 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cai_bootstrap.core.ledger import Ledger
from cai_bootstrap.judge.cache import Cache
from cai_bootstrap.judge.config import JudgeConfig
from cai_bootstrap.judge.farm import Farm, judge_stream
from cai_bootstrap.judge.scorers import EMScorer

ROOT = Path(__file__).resolve().parents[1]

CLEAN = dict(p_500=0.0, p_503=0.0, p_timeout=0.0, p_slow=0.0, p_429=0.0, p_malformed=0.0, api_key=None)


class Server:
    def __init__(self) -> None:
        # the server's stderr (tracebacks of requests the client gave up on) is noise for the bench
        self.p = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fault_server.py")],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.p.stdout.readline().split()
        self.port = int(line[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def reset(self, **kw) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/reset", json=kw, timeout=10)

    def stats(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=10).json()

    def close(self) -> None:
        self.p.terminate()
        self.p.wait(10)


def cfg(url: str, rpm: float, conc: int = 32, **kw) -> JudgeConfig:
    return JudgeConfig(
        model="bench-judge",
        endpoints=[
            {
                "name": "fault",
                "base_url": url,
                "rpm": rpm,
                "max_concurrent": conc,
                "usd_per_m_in": 2.5,
                "usd_per_m_out": 10.0,
            }
        ],
        retry={
            "request_timeout_s": 1.0,
            "backoff_base_s": 0.1,
            "backoff_cap_s": 2.0,
            "deadline_s": 120,
            "recover_s": 10.0,
        }
        | kw.pop("retry", {}),
        concurrency=conc,
        **kw,
    )


def items(n: int, tag: str):
    for i in range(n):
        yield {"id": f"{tag}{i}", "question": f"Bench question {tag} {i}?", "answer": f"Bench answer {i}."}


def run(it, c: JudgeConfig, cache=None, ledger=None, budget=None, run_id="bench"):
    return asyncio.run(
        judge_stream(
            it,
            EMScorer(),
            c,
            cache,
            ledger,
            budget,
            run_id,
            "bench",
            lambda r: None,
            progress=False,
            model=c.model,
            endpoints=c.endpoints,
        )
    )


def rate_ratio(srv: Server, seconds: float, rpm_limit: int, faults: dict) -> dict:
    """Items for about `seconds` of sends; arrivals/min at the server over the configured rpm."""
    configured = rpm_limit * 0.95
    srv.reset(limit=rpm_limit, window_s=60.0, latency=[0.05, 0.2], **(CLEAN | faults))
    c = cfg(srv.url, configured, conc=16)
    n = int(configured / 60 * seconds / 2) + 1  # 2 requests per item

    s = run(items(n, f"r{faults}"), c)
    st = srv.stats()
    span = st["last_start"] - st["first_start"]
    return {
        "rpm_ratio": round((st["requests"] - 1) / span * 60 / configured, 4),
        "self_caused_429": st["r429_limit"],
        "requests": st["requests"],
        "items_ok": s.ok,
        "failed": dict(s.failures),
    }


def one_run_5xx(srv: Server, n: int, rpm_limit: int = 600) -> dict:
    """A strict provider (sliding-window rpm limit) injecting 20% and 50% 500s: the fraction of `n` items judged
    in one run (nothing rerun), with the retry policy's defaults except a bench-sized backoff."""
    out = {}
    for p in (0.2, 0.5):
        srv.reset(limit=rpm_limit, window_s=60.0, latency=[0.02, 0.1], **(CLEAN | {"p_500": p}))
        t0 = time.monotonic()
        s = run(items(n, f"x{p}"), cfg(srv.url, rpm_limit * 0.95, conc=16))
        st = srv.stats()
        out[f"p500_{p:g}"] = {"judged_fraction": round(s.ok / n, 4), "items": n, "requests": st["requests"],
                              "retries": s.retries, "self_caused_429": st["r429_limit"],
                              "seconds": round(time.monotonic() - t0, 1), "failed": dict(s.failures)}
    return out


def dead_endpoint(n: int) -> dict:
    """A pool whose one endpoint refuses connections, with the default retry policy (down_after_s 5, backoff
    0.5 s doubling) and 32 workers: attempts and seconds until the run stops."""
    import socket

    from cai_bootstrap.judge.config import RetryPolicy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    c = cfg(url, 450, conc=32, retry=RetryPolicy().model_dump())
    t0 = time.monotonic()
    s = run(items(n, "dead"), c)
    return {"items": n, "attempts": s.requests_sent, "seconds_to_stop": round(time.monotonic() - t0, 2),
            "items_failed": sum(s.failures.values()), "dropped": s.endpoints_dropped, "stopped": s.no_endpoint}


def billed_ratio(srv: Server, n: int) -> dict:
    srv.reset(
        limit=1_000_000,
        window_s=60.0,
        latency=[0.05, 0.2],
        **(CLEAN | dict(p_500=0.04, p_503=0.03, p_timeout=0.03, hang_s=3.0)),
    )
    # a 2.5 s attempt timeout: above the real latency under load, below the 3 s injected hangs
    c = cfg(srv.url, 3000, conc=32, retry={"request_timeout_s": 2.5})
    s = run(items(n, "billed"), c)
    st = srv.stats()
    completed = s.ok * 2
    return {
        "billed_per_completed": round(st["billed_total"] / completed, 4),
        "items": n,
        "items_ok": s.ok,
        "billed_max_per_prompt": st["billed_max_per_prompt"],
        "retries": s.retries,
    }


def cached_rerun(srv: Server, n: int, tmp: Path) -> dict:
    srv.reset(limit=1_000_000, latency=[0.0, 0.0], **CLEAN)
    c = cfg(srv.url, 60000, conc=64)
    cache, led = Cache(tmp / "rerun.sqlite"), Ledger(tmp / "rerun-ledger.sqlite")
    run(items(n, "cache"), c, cache, led, run_id="first")
    srv.reset()
    t0 = time.perf_counter()
    s = run(items(n, "cache"), c, cache, led, run_id="rerun")
    dt = time.perf_counter() - t0
    return {
        "cached_rerun_s": round(dt, 3),
        "items": n,
        "network_calls": srv.stats()["requests"],
        "cached_items": s.cached_items,
        "rerun_usd": led.total_usd("rerun"),
    }


def budget_overshoot(srv: Server, tmp: Path) -> dict:
    srv.reset(limit=1_000_000, latency=[0.05, 0.2], **CLEAN)
    c = cfg(srv.url, 600000, conc=1000, retry={"request_timeout_s": 60.0})
    worst = c.endpoints[0]
    one = EMScorer().requests(next(items(1, "budget")))["aligned"]
    worst_usd = (one.prompt_bytes() * worst.usd_per_m_in + one.max_tokens * worst.usd_per_m_out) / 1e6
    cap = worst_usd * 300.5
    led = Ledger(tmp / "budget.sqlite")
    s = run(items(1000, "budget"), c, None, led, budget=cap, run_id="budget")
    spent = led.total_usd("budget")
    return {
        "budget_cap_usd": round(cap, 6),
        "spent_usd": round(spent, 6),
        "overshoot_usd": round(max(0.0, spent - cap), 9),
        "worst_case_request_usd": round(worst_usd, 6),
        "stopped_cleanly": s.budget_stopped,
        "failed": dict(s.failures),
        "items_ok": s.ok,
        "items_not_sent": s.remaining,
        "not_sent_worst_usd": round(s.remaining_usd, 6),
    }


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream_rss(n: int) -> dict:
    """Stream n items through the bounded queue and workers; the HTTP transport is in-process (MockTransport)
    so the figure measures the farm's own memory and not a million network round trips."""
    body = json.dumps(
        {
            "choices": [
                {
                    "message": {"content": "50"},
                    "logprobs": {
                        "content": [
                            {
                                "token": "50",
                                "logprob": -0.1,
                                "top_logprobs": [{"token": "50", "logprob": -0.1}],
                            }
                        ]
                    },
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 1},
        }
    ).encode()
    c = cfg("http://mock/v1", 1e9, conc=32)
    samples = []

    async def go():
        farm = Farm(EMScorer(), c, None, None, None, "rss", "bench", c.model, c.endpoints)
        await farm.pool.client.aclose()
        farm.pool.client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body))
        )
        done = [0]

        def sink(r):
            done[0] += 1
            if done[0] % (n // 10) == 0:
                samples.append(round(rss_mb(), 1))

        return await farm.run_stream(items(n, "rss"), sink)

    t0 = time.perf_counter()
    s = asyncio.run(go())
    return {
        "stream_items": n,
        "stream_ok": s.ok,
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_mb_by_tenth": samples,
        "stream_s": round(time.perf_counter() - t0, 1),
    }


def farm_cpu(srv: Server, rps: int, seconds: float) -> dict:
    """The farm's own CPU per 100 req/s at a target rate, with each HTTP transport, side by side."""
    out: dict = {"target_rps": rps}
    for transport in ("httpx", "aiohttp"):
        srv.reset(limit=1_000_000, latency=[0.0, 0.01], **CLEAN)
        c = cfg(srv.url, rps * 60, conc=64, transport=transport)
        n = int(rps * seconds / 2)
        t0, c0 = time.perf_counter(), time.process_time()
        s = run(items(n, f"cpu-{transport}"), c)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        achieved = s.requests_sent / wall
        out[transport] = {
            "achieved_rps": round(achieved, 1),
            "cpu_ms_per_request": round(cpu / s.requests_sent * 1000, 3),
            "farm_cpu_pct_per_100rps": round(cpu / wall * 100 / (achieved / 100), 2),
        }
    out["aiohttp_over_httpx_cpu"] = round(
        out["aiohttp"]["cpu_ms_per_request"] / out["httpx"]["cpu_ms_per_request"], 3
    )
    return out


def limiter_cpu(rps: int = 500, seconds: float = 4.0, waiters: int = 64) -> dict:
    """The rate limiter alone: asyncio-throttle (polls every 10 ms per waiter) vs SpacedLimiter."""
    from asyncio_throttle import Throttler

    from cai_bootstrap.judge.limits import SpacedLimiter

    async def with_throttle():
        th = Throttler(rate_limit=rps, period=1.0)
        end = time.monotonic() + seconds
        count = [0]

        async def w():
            while time.monotonic() < end:
                async with th:
                    count[0] += 1

        await asyncio.gather(*(w() for _ in range(waiters)))
        return count[0]

    async def with_spaced():
        lim = SpacedLimiter(rps * 60)
        end = time.monotonic() + seconds
        count = [0]

        async def w():
            while time.monotonic() < end:
                at = lim.reserve()
                if (d := at - time.monotonic()) > 0:
                    await asyncio.sleep(d)
                count[0] += 1

        await asyncio.gather(*(w() for _ in range(waiters)))
        return count[0]

    out = {}
    for name, fn in (("throttle", with_throttle), ("limiter", with_spaced)):
        c0, t0 = time.process_time(), time.perf_counter()
        n = asyncio.run(fn())
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        out[f"{name}_rps"] = round(n / wall, 1)
        out[f"{name}_cpu_pct_per_100rps"] = round(cpu / wall * 100 / (n / wall / 100), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--stream-items", type=int, default=1_000_000)
    ap.add_argument("--rerun-items", type=int, default=1000)
    ap.add_argument("--phases", default="clean,failures_20pct,one_run_5xx,dead_endpoint,faults_10pct,cached_rerun,"
                    "budget,cpu,limiter,stream",
                    help="comma-separated subset of the phases to run")
    a = ap.parse_args()
    wanted = set(a.phases.split(","))
    srv = Server()
    tmp = Path(tempfile.mkdtemp(prefix="judge-bench-"))
    out: dict = {}

    def phase(name, fn, *args):
        if name not in wanted:
            return
        out[name] = fn(*args)
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)  # partial figures as they come

    try:
        phase("clean", rate_ratio, srv, a.seconds, 600, {})
        phase("failures_20pct", rate_ratio, srv, a.seconds, 600, {"p_500": 0.1, "p_503": 0.1})
        phase("one_run_5xx", one_run_5xx, srv, 150)
        phase("dead_endpoint", dead_endpoint, 1000)
        phase("faults_10pct", billed_ratio, srv, 500)
        phase("cached_rerun", cached_rerun, srv, a.rerun_items, tmp)
        phase("budget", budget_overshoot, srv, tmp)
        phase("cpu", farm_cpu, srv, 500, 8.0)
        phase("limiter", limiter_cpu)
    finally:
        srv.close()
    if a.stream_items:
        phase("stream", stream_rss, a.stream_items)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
