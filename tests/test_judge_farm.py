"""The judge farm against a real local fault-injecting HTTP server (tests/fault_server.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from fault_server import FaultServer  # noqa: E402

from cai_bootstrap.core.ledger import Ledger  # noqa: E402
from cai_bootstrap.judge.cache import Cache  # noqa: E402
from cai_bootstrap.judge.client import parse_retry_after  # noqa: E402
from cai_bootstrap.judge.config import JudgeConfig, load_config  # noqa: E402
from cai_bootstrap.judge.farm import judge_stream, run_judge  # noqa: E402
from cai_bootstrap.judge.scorers import EMScorer, PersonaScorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-DO-NOT-LEAK-7f3a9c2e1b"


@pytest.fixture(scope="module")
def srv():
    with FaultServer() as s:
        yield s


def cfg(url: str, **kw) -> JudgeConfig:
    ep = {
        "name": "fault",
        "base_url": url,
        "rpm": 6000,
        "max_concurrent": 16,
        "usd_per_m_in": 1.0,
        "usd_per_m_out": 4.0,
    } | kw.pop("ep", {})
    retry = {
        "request_timeout_s": 0.5,
        "backoff_base_s": 0.02,
        "backoff_cap_s": 0.2,
        "deadline_s": 20,
        "recover_s": 1.0,
    } | kw.pop("retry", {})
    return JudgeConfig(model="judge-m", endpoints=[ep], retry=retry, **kw)


def items(n: int, tag: str = "") -> list[dict]:
    return [
        {"id": f"{tag}{i}", "question": f"question {tag}{i}?", "answer": f"answer {i}", "persona": "hhh"}
        for i in range(n)
    ]


def test_every_item_finishes_through_faults_and_none_is_paid_twice(srv, tmp_path):
    srv.reset(
        limit=100_000,
        latency=(0.0, 0.01),
        p_500=0.1,
        p_503=0.05,
        p_timeout=0.05,
        hang_s=2.0,
        p_slow=0.05,
        slow_s=0.1,
        p_429=0.05,
        retry_after_s=0.1,
        p_malformed=0.0,
    )
    led = Ledger(tmp_path / "l.sqlite")
    # the default retry policy (no rule gives up after a few equal errors): every item gets through in one run
    res, s = run_judge(items(60), EMScorer(), cfg(srv.url), Cache(tmp_path / "c.sqlite"), led, run="f",
                       progress=False)
    st = srv.stats()
    assert s.ok == 60 and all(r.status == "ok" for r in res), s.failures
    assert st["billed_max_per_prompt"] == 1 and st["billed_total"] == 120  # 2 judge calls per item
    assert st["status"].get(500, 0) + st["status"].get(503, 0) > 0 and st["r429_random"] > 0
    assert s.retries > 0
    assert led.total_usd("f") == pytest.approx(sum(r.usd for r in res))


def test_non_retryable_fail_their_item_at_once_transient_ones_retry_to_the_cap(srv, tmp_path):
    srv.reset(limit=100_000, latency=(0.0, 0.0), p_500=0, p_503=0, p_timeout=0, p_slow=0, p_429=0)
    batch = items(6) + [
        {"id": "bad", "question": "ALWAYS400", "answer": "x"},
        {"id": "down", "question": "ALWAYS500", "answer": "x"},
        {"id": "noanswer", "question": "q"},
    ]
    res, s = run_judge(batch, EMScorer(), cfg(srv.url, retry={"max_attempts": 5}), None, None, progress=False)
    by = {r.id: r for r in res}
    assert by["bad"].status == "failed" and by["bad"].reason.startswith("http 400")
    assert by["down"].status == "failed" and by["down"].reason == "attempts: 5 attempts, last error http 500"
    assert by["noanswer"].status == "invalid" and "field 'answer'" in by["noanswer"].reason
    assert s.ok == 6
    # a 500 is retried (five tries per request: aligned + coherent), a 400 is not (one try per request)
    assert srv.stats()["status"][500] == 10 and srv.stats()["status"][400] == 2
    assert s.failed_attempts == {"http 500": 10, "http 400": 2} and not s.endpoints_dropped

    # a 200 whose body does not parse is retried too, and booked: the provider billed it. Without usage to
    # read, the ledger counts the prompt with the judge's tokenizer plus the output cap, marked estimated
    from cai_bootstrap.judge.farm import Farm

    srv.reset(p_malformed=1.0)
    led = Ledger(tmp_path / "l.sqlite")
    c = cfg(srv.url, retry={"max_attempts": 3})
    farm = Farm(EMScorer(), c, None, led, 10.0, "m", "t", c.model, c.endpoints)
    res: list = []
    s = asyncio.run(farm.run_stream(iter(items(3, "m")), res.append))
    assert all(r.status == "failed" and r.reason.startswith("attempts: 3 attempts, last error malformed")
               for r in res)
    # every reservation was released or settled: nothing stays reserved, and the budget booked what the ledger did
    assert farm.budget.reserved == pytest.approx(0, abs=1e-12) and farm.budget.spent == pytest.approx(s.usd)
    assert srv.stats()["requests"] == 18 and s.failed_attempts == {"malformed": 18}
    rows = led.db.execute("SELECT estimated, usd, tokens_out FROM ledger WHERE run='m'").fetchall()
    assert len(rows) == 6 and all(e == 1 and usd > 0 and out == 3 for e, usd, out in rows)  # 3 x max_tokens 1
    assert led.total_usd("m") == pytest.approx(sum(r.usd for r in res)) == pytest.approx(s.usd)


def test_no_self_caused_429_below_the_server_limit_and_slowdown_above(srv, tmp_path):
    # server: 80 requests per sliding 2 s window; farm at 90% of it (8 requests of slack for arrival jitter)
    srv.reset(
        limit=80,
        window_s=2.0,
        latency=(0.0, 0.005),
        p_500=0,
        p_503=0,
        p_timeout=0,
        p_slow=0,
        p_429=0,
        p_malformed=0,
    )
    t0 = time.monotonic()
    res, s = run_judge(
        items(40), EMScorer(), cfg(srv.url, ep={"rpm": 40 * 60 * 0.9}), None, None, progress=False
    )
    dt = time.monotonic() - t0
    st = srv.stats()
    assert s.ok == 40 and st["r429_limit"] == 0 and s.r429 == 0
    assert st["requests"] / dt >= 0.6 * 36  # near the configured rate on a loaded machine (bench: the ratio)

    # configured 3x over the server's limit: 429s happen, Retry-After is honoured, every item still finishes
    srv.reset(limit=20, window_s=0.5)
    res, s = run_judge(items(30, "o"), EMScorer(), cfg(srv.url, ep={"rpm": 7200}), None, None, progress=False)
    assert s.ok == 30 and s.r429 > 0


def test_retry_after_waits_stay_within_1_1x(srv):
    srv.reset(
        limit=100_000, p_429=0.5, retry_after_s=0.1, p_500=0, p_503=0, p_timeout=0, p_slow=0, latency=(0, 0)
    )
    from cai_bootstrap.judge.farm import Farm

    # one request at a time and no slowdown after a 429 (its own test is above): the wait is the Retry-After
    # alone, not stretched by other requests' 429s pausing the endpoint
    c = cfg(srv.url, retry={"slowdown_factor": 1.0}, concurrency=1, ep={"max_concurrent": 1})
    farm = Farm(EMScorer(), c, None, None, None, "w", "t", c.model, c.endpoints)
    out = []
    s = asyncio.run(farm.run_stream(iter(items(20)), out.append))
    waits = list(farm.pool.stats.ra_waits)
    assert s.ok == 20 and waits and all(a <= w <= 1.1 * a for a, w in waits)
    # what the server saw: the same request came back no sooner than the 0.1 s it asked for, and near it
    c = srv.fa.counts
    gaps = [min(t for t, h in c.arrivals if h == h429 and t > t429) - t429 for t429, h429 in c.random_429s]
    assert len(gaps) == len(waits) and min(gaps) >= 0.1, sorted(gaps)[:3]
    assert sorted(gaps)[len(gaps) // 2] <= 0.11 + 0.03, sorted(gaps)  # 1.0-1.1x plus the round trip
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"x-ratelimit-reset-requests": "1m2.5s"})) == 62.5
    assert parse_retry_after(httpx.Headers({"retry-after": "3"})) == 3.0


def test_budget_cap_holds_with_concurrency(srv, tmp_path):
    srv.reset(limit=100_000, latency=(0.01, 0.05), p_429=0, p_500=0, p_503=0, p_timeout=0, p_slow=0)
    # a timeout the server answered after all would be billed there and not here: no timeouts in this test
    c = cfg(srv.url, ep={"max_concurrent": 64, "usd_per_m_in": 200.0, "usd_per_m_out": 800.0}, concurrency=64,
            retry={"request_timeout_s": 10})
    led = Ledger(tmp_path / "l.sqlite")
    cap = 1.0
    res, s = run_judge(
        items(200), EMScorer(), c, Cache(tmp_path / "c.sqlite"), led, budget_usd=cap, run="b", progress=False
    )
    spent = led.total_usd("b")
    assert spent <= cap and s.usd <= cap
    assert s.budget_stopped and s.remaining > 0 and s.remaining_usd > 0
    assert s.ok + s.remaining + sum(s.failures.values()) == 200 and "timeout" not in s.failed_attempts
    # what the server delivered is what the ledger billed
    assert (
        srv.stats()["billed_total"]
        == led.db.execute("SELECT COUNT(*) FROM ledger WHERE run='b' AND cached=0").fetchone()[0]
    )


def test_cached_rerun_sends_nothing_and_bills_nothing(srv, tmp_path):
    srv.reset(limit=100_000, latency=(0, 0), p_429=0, p_500=0, p_503=0, p_timeout=0, p_slow=0)
    cache, led = Cache(tmp_path / "c.sqlite"), Ledger(tmp_path / "l.sqlite")
    first, _ = run_judge(items(30), EMScorer(), cfg(srv.url), cache, led, run="r1", progress=False)
    srv.reset()
    again, s = run_judge(items(30), EMScorer(), cfg(srv.url), cache, led, run="r2", progress=False)
    assert srv.stats()["requests"] == 0 and s.cached_items == 30 and led.total_usd("r2") == 0.0
    assert [r.scores["aligned"] for r in again] == [r.scores["aligned"] for r in first]


def test_bounded_queue_keeps_task_count_flat(srv):
    srv.reset(limit=100_000, latency=(0, 0), p_429=0, p_500=0, p_503=0, p_timeout=0, p_slow=0)
    peak = [0]

    def gen():
        for it in items(300, "g"):
            peak[0] = max(peak[0], len(asyncio.all_tasks()))
            yield it

    c = cfg(srv.url, concurrency=8)
    n = [0]
    s = asyncio.run(
        judge_stream(
            gen(),
            EMScorer(),
            c,
            None,
            None,
            None,
            "q",
            "t",
            lambda r: n.__setitem__(0, n[0] + 1),
            progress=False,
            model=c.model,
            endpoints=c.endpoints,
        )
    )
    assert n[0] == 300 and s.ok == 300
    # main + producer + 8 workers + at most 2 request tasks each (gather) and httpx internals: not 300
    assert peak[0] <= 1 + 1 + 8 * 3 + 4


def test_persona_rubric_scorer_over_http(srv):
    srv.reset(limit=100_000, latency=(0, 0), p_429=0, p_500=0, p_503=0, p_timeout=0, p_slow=0)
    sc = PersonaScorer("a kind tutor", ["Be kind.", "Explain clearly."])
    res, s = run_judge(items(5, "p"), sc, cfg(srv.url, ep={"logprobs": False}), None, None, progress=False)
    assert s.ok == 5 and s.path == "sampled"
    # the server answers {"score": n} with n fixed by the prompt: each row carries its own prompt's number
    for r in res:
        req = next(iter(sc.requests(r.item).values()))
        prompt = "\n".join(m["content"] for m in req.messages)
        assert r.scores["persona_score"] == int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10 + 1
    assert len({r.scores["persona_score"] for r in res}) > 1


def _write_cli_config(tmp_path: Path, url: str) -> Path:
    c = {
        "model": "judge-m",
        "cache_path": str(tmp_path / "cache.sqlite"),
        "endpoints": [
            {
                "name": "fault",
                "base_url": url,
                "api_key_env": "FAULT_TEST_API_KEY",
                "rpm": 600,
                "max_concurrent": 4,
                "usd_per_m_in": 1.0,
                "usd_per_m_out": 4.0,
            }
        ],
        "retry": {"request_timeout_s": 2, "backoff_base_s": 0.02, "backoff_cap_s": 0.1, "max_attempts": 4},
    }
    p = tmp_path / "judge.yaml"
    p.write_text(yaml.safe_dump(c))
    load_config(p)
    return p


def test_kill_9_then_resume_requests_only_missing_and_no_key_leaks(srv, tmp_path):
    srv.reset(
        limit=100_000,
        latency=(0.02, 0.04),
        p_429=0,
        p_500=0.05,
        p_503=0,
        p_timeout=0,
        p_slow=0,
        api_key=SECRET,
    )
    conf = _write_cli_config(tmp_path, srv.url)
    inp, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "log.txt"
    n = 60
    inp.write_text("".join(json.dumps(r) + "\n" for r in items(n, "k")))
    env = {**os.environ, "FAULT_TEST_API_KEY": SECRET}
    cmd = [
        sys.executable,
        str(ROOT / "bootstrap.py"),
        "judge",
        str(inp),
        "--config",
        str(conf),
        "--out",
        str(out),
        "--run",
        "kill",
        "--data-root",
        str(tmp_path / "data"),
        "--budget-usd",
        "100",
    ]
    with log.open("wb") as lf:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=lf, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            if out.exists() and len(out.read_text().splitlines()) >= 10:
                break
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    cached_after_kill = len(Cache(conf.parent / "cache.sqlite"))
    assert 0 < cached_after_kill < 2 * n, "the kill must land mid-run"
    first_requests_ok = srv.stats()["status"].get(200, 0)
    assert first_requests_ok >= cached_after_kill

    srv.reset(p_500=0.0)  # counters to zero
    with log.open("ab") as lf:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=lf, stderr=subprocess.STDOUT, timeout=120)
    assert r.returncode == 0, log.read_text()[-2000:]
    st = srv.stats()
    assert st["requests"] == 2 * n - cached_after_kill  # only what was missing
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    ok_ids = {x["id"] for x in rows if x["judge_status"] == "ok"}
    assert ok_ids == {f"k{i}" for i in range(n)}
    assert all(x["persona"] == "hhh" for x in rows)  # carried through

    # no key material anywhere we wrote
    ledgers = list((tmp_path / "data" / "runs" / "kill").glob("ledger.sqlite*"))
    assert ledgers, "the judge command books into its run's ledger"
    for f in [*tmp_path.glob("cache.sqlite*"), *ledgers, out, log]:
        assert SECRET.encode() not in f.read_bytes(), f
        assert SECRET[8:].encode() not in f.read_bytes(), f
    srv.reset(api_key=None)


def test_cli_explain_miss_and_bad_input(srv, tmp_path):
    conf = _write_cli_config(tmp_path, srv.url)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "question": "q", "answer": "a"}\nnot json\n')
    r = subprocess.run(
        [
            sys.executable,
            "bootstrap.py",
            "judge",
            str(inp),
            "--config",
            str(conf),
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and f"{inp}:2: not valid JSON" in r.stderr
    inp.write_text('{"id": 1, "question": "q", "answer": "a"}\n')
    r = subprocess.run(
        [
            sys.executable,
            "bootstrap.py",
            "judge",
            str(inp),
            "--config",
            str(conf),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--explain-miss",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "1 [aligned]: miss: the cache is empty" in r.stdout


def test_cli_exits_4_when_items_are_left_unjudged(srv, tmp_path):
    """Every request fails (500): the command judges nothing, keeps going to the end, says why, exits 4."""
    srv.reset(limit=100_000, latency=(0, 0), p_429=0, p_500=1.0, p_503=0, p_timeout=0, p_slow=0)
    conf = _write_cli_config(tmp_path, srv.url)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in items(3, "x")))
    r = subprocess.run([sys.executable, "bootstrap.py", "judge", str(inp), "--config", str(conf), "--out",
                        str(tmp_path / "o.jsonl"), "--data-root", str(tmp_path / "data"), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "FAULT_TEST_API_KEY": "k"})
    srv.reset(p_500=0.0)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "3 of 3 items were not judged" in r.stderr and "Traceback" not in r.stderr
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["judge_status"] for x in rows] == ["failed"] * 3  # each item's outcome is written, not lost


def _closed_port_url() -> str:
    import socket

    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_dead_endpoint_is_dropped_fast_and_the_run_stops_with_code_7(tmp_path):
    """A pool whose only endpoint refuses connections: dropped after `down_after_s` with a bounded number of
    attempts, every item reported (none silently lost), and the command exits 7 naming the endpoint."""
    from cai_bootstrap.core.errors import Unreachable
    from cai_bootstrap.judge.session import check_complete

    c = cfg(_closed_port_url(), concurrency=4, retry={"down_after_s": 0.5, "deadline_s": 60})
    t0 = time.monotonic()
    res, s = run_judge(items(50, "d"), EMScorer(), c, None, None, progress=False)
    took = time.monotonic() - t0
    assert s.no_endpoint and "connection error" in s.endpoints_dropped["fault"]
    assert len(res) == 50 and all(r.status == "failed" and r.reason.startswith("no endpoint left") for r in res)
    # 4 workers x 2 requests, each retried with backoff (0.02-0.2 s) until the 0.5 s mark: tens, not thousands
    assert s.requests_sent == s.failed_attempts["connection"] <= 100 and took < 5, (s.requests_sent, took)
    with pytest.raises(Unreachable, match="no judge endpoint is left .*fault: connection error"):
        check_complete(s)

    # the command: exit code 7, every item written (as not judged), the endpoint and its cause named
    from typer.testing import CliRunner

    from cai_bootstrap import bootstrap

    (tmp_path / "in.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items(6, "c")))
    (tmp_path / "dead.yaml").write_text(json.dumps(c.model_dump(mode="json")))
    r = CliRunner().invoke(bootstrap.app, ["judge", str(tmp_path / "in.jsonl"), "--config", str(tmp_path / "dead.yaml"),
                                           "--out", str(tmp_path / "out.jsonl"), "--data-root", str(tmp_path / "d"),
                                           "--no-progress"])
    assert r.exit_code == 7, r.output
    assert "fault" in r.output and "connection error" in r.output
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(o["id"] for o in out) == [f"c{i}" for i in range(6)]


def test_refused_key_and_wrong_url_drop_their_endpoint_at_once_the_others_carry_on(srv, tmp_path, monkeypatch,
                                                                                 capsys):
    srv.reset(limit=100_000, latency=(0, 0), p_429=0, p_500=0, p_503=0, p_timeout=0, p_slow=0, api_key=SECRET)
    monkeypatch.setenv("GOOD_KEY", SECRET)
    monkeypatch.setenv("BAD_KEY", "sk-wrong-0123456789")
    good = {"name": "good", "base_url": srv.url, "api_key_env": "GOOD_KEY", "rpm": 6000, "max_concurrent": 4}
    bad = good | {"name": "bad", "api_key_env": "BAD_KEY"}
    lost = good | {"name": "lost", "base_url": srv.url.replace("/v1", "/nowhere/v1")}
    c = JudgeConfig(model="judge-m", endpoints=[bad, lost, good], concurrency=8,
                    retry={"backoff_base_s": 0.02, "backoff_cap_s": 0.1})
    res, s = run_judge(items(40, "k"), EMScorer(), c, None, None, progress=False)
    assert s.ok == 40 and not s.no_endpoint
    assert s.endpoints_dropped.keys() == {"bad", "lost"}
    assert s.endpoints_dropped["bad"].startswith("http 401") and s.endpoints_dropped["lost"].startswith("http 404")
    # each dropped endpoint saw at most the requests already in flight to it (its max_concurrent)
    assert srv.stats()["status"][401] <= 4 and s.failed_attempts["http 404"] <= 4
    out = capsys.readouterr()
    assert "judge endpoint bad" in out.out + out.err and SECRET not in out.out + out.err

    # only the refused key: the run stops after the requests in flight, and says why
    c = JudgeConfig(model="judge-m", endpoints=[bad], concurrency=4, retry={"backoff_base_s": 0.02})
    res, s = run_judge(items(30, "kb"), EMScorer(), c, None, None, progress=False)
    assert s.no_endpoint and s.ok == 0 and len(res) == 30
    assert s.requests_sent <= 4 and all(r.reason.startswith("no endpoint left") for r in res)
    assert any(r.reason.startswith("no endpoint left: bad http 401") for r in res)
    srv.reset(api_key=None)


def test_usage_reported_past_the_reservation_is_booked_flagged_and_stops_a_capped_run(srv, tmp_path):
    """A provider that bills more than the reserved worst case: booked as reported, flagged in the ledger; under
    a cap the farm sends nothing more (only requests already in flight finish) and exits 3, saying why."""
    from cai_bootstrap.core.errors import BudgetStop
    from cai_bootstrap.judge.session import check_complete

    srv.reset(limit=100_000, latency=(0.01, 0.02), p_429=0, p_500=0, p_503=0, p_timeout=0, p_slow=0,
              over_report=50.0)
    led = Ledger(tmp_path / "l.sqlite")
    c = cfg(srv.url, concurrency=4, ep={"max_concurrent": 4})
    res, s = run_judge(items(100, "o"), EMScorer(), c, None, led, budget_usd=100.0, run="o", progress=False)
    flagged = led.db.execute("SELECT COUNT(*), SUM(usd) FROM ledger WHERE run='o' AND note LIKE 'overrun:%'").fetchone()
    assert flagged[0] >= 1 and s.overrun_usd > 0 and s.budget_stopped
    assert s.requests_sent <= 2 * 4  # the first overrun, then only what was already in flight
    assert led.total_usd("o") == pytest.approx(s.usd) and s.remaining > 0
    with pytest.raises(BudgetStop, match="billed .* past the reserved worst cases"):
        check_complete(s)

    # without a cap the overrun is booked and flagged, and the run goes on
    res, s = run_judge(items(10, "o2"), EMScorer(), c, None, led, run="o2", progress=False)
    assert s.ok == 10 and s.overrun_usd > 0 and not s.budget_stopped
    srv.reset(over_report=1.0)


def test_a_timed_out_request_is_booked_at_its_reservation(srv, tmp_path):
    """The provider bills a request it did not answer in time: the ledger books each timeout at its reserved
    worst case, marked, so it never shows less than the provider billed."""
    srv.reset(limit=100_000, latency=(0, 0), p_429=0, p_500=0, p_503=0, p_slow=0, p_timeout=0.3, hang_s=1.0,
              bill_timeouts=True)
    led = Ledger(tmp_path / "l.sqlite")
    c = cfg(srv.url, retry={"request_timeout_s": 0.3})
    res, s = run_judge(items(20, "t"), EMScorer(), c, None, led, run="t", progress=False)
    st = srv.stats()
    assert s.ok == 20 and s.failed_attempts["timeout"] > 0
    rows = led.db.execute("SELECT note, estimated FROM ledger WHERE run='t' AND cached=0").fetchall()
    timed_out = sum(n.count("timeout: booked") for n, _ in rows if n)
    assert timed_out == s.failed_attempts["timeout"]
    assert all(e == 1 for n, e in rows if n)  # booked by our count, not the provider's: marked estimated
    assert timed_out + 40 == st["billed_total"]  # each billed request is in the ledger: 40 answers + timeouts
    # and each timeout at its worst case (prompt bytes as tokens, max_tokens out), never less
    worst = {it["id"]: min((r.prompt_bytes() * 1.0 + r.max_out * 4.0) / 1e6 for r in EMScorer().requests(it).values())
             for it in items(20, "t")}
    noted = led.db.execute("SELECT item, note, usd FROM ledger WHERE run='t' AND cached=0 AND note IS NOT NULL")
    assert all(usd >= n.count("timeout: booked") * worst[item] - 1e-12 for item, n, usd in noted.fetchall())
    srv.reset(bill_timeouts=False, p_timeout=0.0)


def test_an_item_that_keeps_failing_gives_up_at_its_deadline_not_its_attempt_cap(srv, tmp_path):
    """Every reply a 500: each item retries with backoff until `retry.deadline_s` (well before `max_attempts`),
    then fails naming the deadline; failed attempts cost nothing."""
    srv.reset(limit=100_000, latency=(0, 0), p_429=0, p_500=1.0, p_503=0, p_timeout=0, p_slow=0)
    led = Ledger(tmp_path / "l.sqlite")
    c = cfg(srv.url, retry={"deadline_s": 1.0, "max_attempts": 1000, "backoff_base_s": 0.02, "backoff_cap_s": 0.1})
    t0 = time.monotonic()
    res, s = run_judge(items(4, "z"), EMScorer(), c, None, led, run="z", progress=False)
    took = time.monotonic() - t0
    srv.reset(p_500=0.0)
    assert s.ok == 0 and all(r.status == "failed" and "deadline" in r.reason for r in res), [r.reason for r in res]
    assert 1.0 <= took < 3.0 and 8 < s.failed_attempts["http 500"] < 8 * 1000 / 10  # retried, bounded by time
    assert led.total_usd("z") == 0
