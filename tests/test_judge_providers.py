"""The judge APIs beyond OpenAI-compatible live chat: the Anthropic Messages API, replies without usage, and batch
mode (OpenAI Batch, Anthropic Message Batches), each against the local fake of that API (tests/fault_server.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from fault_server import FaultServer  # noqa: E402

from cai_bootstrap.core.errors import BudgetStop, ItemsFailed  # noqa: E402
from cai_bootstrap.core.ledger import Ledger  # noqa: E402
from cai_bootstrap.judge.cache import Cache  # noqa: E402
from cai_bootstrap.judge.config import JudgeConfig  # noqa: E402
from cai_bootstrap.judge.farm import run_judge  # noqa: E402
from cai_bootstrap.judge.scorers import EMScorer  # noqa: E402
from cai_bootstrap.judge.session import check_complete  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECRET = "ant-test-key-DO-NOT-LEAK-4b1d9e"
QUIET = dict(limit=100_000, latency=(0, 0), p_429=0, p_500=0, p_503=0, p_timeout=0, p_slow=0, p_malformed=0,
             no_usage=False, batch_polls=2, batch_p_errored=0.0, batch_p_expired=0.0, api_key=None)


@pytest.fixture(scope="module")
def srv():
    with FaultServer() as s:
        yield s


def items(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "question": f"question {tag}{i}?", "answer": f"answer {i}", "persona": "hhh"}
            for i in range(n)]


def config(url: str, provider: str = "openai", **kw) -> JudgeConfig:
    ep = {"name": "fake", "provider": provider, "base_url": url, "rpm": 6000, "max_concurrent": 8,
          "usd_per_m_in": 3.0, "usd_per_m_out": 15.0} | kw.pop("ep", {})
    retry = {"request_timeout_s": 2, "backoff_base_s": 0.02, "backoff_cap_s": 0.2, "deadline_s": 30}
    retry |= kw.pop("retry", {})
    return JudgeConfig(model="judge-m", endpoints=[ep], retry=retry, **kw)


def ledger_rows(led: Ledger, run: str) -> list[dict]:
    cur = led.db.execute("SELECT * FROM ledger WHERE run=? AND cached=0", (run,))
    return [dict(zip([c[0] for c in cur.description], r, strict=True)) for r in cur.fetchall()]


def test_anthropic_messages_sampled_under_faults_billed_as_reported(srv, tmp_path, monkeypatch):
    """Claude through the Messages API: x-api-key, no logprobs (the sampled path, chosen from the config), 529s
    and 429s retried; the ledger bills the usage Anthropic reports, and the key is nowhere on disk."""
    srv.reset(**QUIET | dict(p_500=0.1, p_503=0.1, p_429=0.05, retry_after_s=0.05, api_key=SECRET))
    monkeypatch.setenv("ANTHROPIC_TEST_KEY", SECRET)
    c = config(srv.url, "anthropic", ep={"api_key_env": "ANTHROPIC_TEST_KEY"}, samples=2,
               max_completion_tokens=64, retry={"request_timeout_s": 10})  # no timeouts: they are booked apart
    assert c.endpoints[0].logprobs is False
    led, cache = Ledger(tmp_path / "l.sqlite"), Cache(tmp_path / "c.sqlite")
    res, s = run_judge(items(12, "a"), EMScorer(), c, cache, led, run="a", progress=False)
    st = srv.stats()
    assert s.ok == 12 and s.path == "sampled", s.failures
    assert all(0 <= r.scores["aligned"] <= 100 for r in res)
    assert st["status"].get(529, 0) > 0 and st["status"].get(429, 0) > 0 and st["status"].get(401, 0) == 0
    rows = ledger_rows(led, "a")
    assert len(rows) == st["billed_total"] == 12 * 2 * 2, st  # 2 metrics x 2 samples, each billed once
    assert all(r["estimated"] == 0 and r["usd"] == pytest.approx((r["tokens_in"] * 3 + r["tokens_out"] * 15) / 1e6)
               for r in rows)
    assert s.failed_attempts.get("http 529", 0) == st["status"][529]  # failed attempts counted, not billed
    for f in tmp_path.iterdir():
        assert SECRET.encode() not in f.read_bytes()


def test_anthropic_rejects_logprobs_in_the_config(tmp_path):
    with pytest.raises(ValueError, match="logprobs: the Anthropic Messages API returns no logprobs"):
        config("http://127.0.0.1:1/v1", "anthropic", ep={"logprobs": True})


def test_reply_without_usage_is_billed_by_the_judges_tokenizer_marked_estimated(srv, tmp_path):
    """Digit-heavy answers (SmolLM2 writes each digit as a token) tell the tokenizer's count from bytes / 4:
    with the judge's tokenizer each prompt is counted exactly; without one, bytes / 4."""
    import math

    from transformers import AutoTokenizer

    from cai_bootstrap.engine.models import tiny_model_dir
    from cai_bootstrap.judge.client import _prompt_text

    srv.reset(**QUIET | dict(no_usage=True))
    tok_dir = str(tiny_model_dir())
    tok = AutoTokenizer.from_pretrained(tok_dir)
    its = [it | {"answer": "0123456789" * 40 + it["answer"]} for it in items(3, "u")]
    want = {it["id"]: sorted(_prompt_text(r) for r in EMScorer().requests(it).values()) for it in its}
    for name, cfg_kw, count in (("tok", {"tokenizer": tok_dir}, lambda t: len(tok.encode(t, add_special_tokens=False))),
                                ("bytes", {}, lambda t: math.ceil(len(t.encode()) / 4))):
        led = Ledger(tmp_path / f"{name}.sqlite")
        res, s = run_judge(its, EMScorer(), config(srv.url, scoring="logprobs", **cfg_kw), None, led, run=name,
                           progress=False)
        assert s.ok == 3 and s.estimated == 6
        rows = ledger_rows(led, name)
        assert len(rows) == 6 and all(r["estimated"] == 1 for r in rows)
        for item_id, texts in want.items():  # each metric's prompt, counted (not the worst case)
            got = sorted(r["tokens_in"] for r in rows if r["item"] == item_id)
            assert got == sorted(count(t) for t in texts), (name, item_id)
        assert led.total_usd(name) == pytest.approx(s.usd) and s.usd < sum(r.usd for r in res) + 1e-12
    assert count(texts[0]) * 2 < len(tok.encode(texts[0], add_special_tokens=False))  # the two counts differ


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_batch_mode_submits_polls_downloads_bills_at_the_batch_price_and_reruns_send_nothing(srv, tmp_path,
                                                                                             provider):
    srv.reset(**QUIET)
    scoring = {"openai": "logprobs", "anthropic": "sampled"}[provider]
    c = config(srv.url, provider, batch=True, batch_poll_s=0.02, scoring=scoring, samples=1,
               max_completion_tokens=32)
    led, cache = Ledger(tmp_path / "l.sqlite"), Cache(tmp_path / "c.sqlite")
    res, s = run_judge(items(10, provider), EMScorer(), c, cache, led, run="b", progress=False)
    st = srv.stats()
    assert s.ok == 10 and s.requests_sent == 0 and st["requests"] == 0  # nothing went live
    assert st["batches_created"] == 1 and st["batch_billed_total"] == 20 and st["batch_billed_prompts"] == 20
    assert [b["status"] for b in s.batches] == [{"openai": "completed", "anthropic": "ended"}[provider]]
    rows = ledger_rows(led, "b")
    assert len(rows) == 20 and all(r["endpoint"] == "fake:batch" for r in rows)
    assert all(r["usd"] == pytest.approx((r["tokens_in"] * 3 + r["tokens_out"] * 15) / 1e6 * 0.5) for r in rows)
    assert led.total_usd("b") == pytest.approx(s.usd)

    again, s2 = run_judge(items(10, provider), EMScorer(), c, cache, led, run="b2", progress=False)
    assert srv.stats()["batches_created"] == 1 and s2.cached_items == 10 and led.total_usd("b2") == 0
    assert [r.scores["aligned"] for r in again] == [r.scores["aligned"] for r in res]


def test_batch_errors_fail_their_items_a_rerun_batches_only_those_and_the_cap_holds(srv, tmp_path):
    srv.reset(**QUIET | dict(batch_p_errored=0.3, batch_p_expired=0.1))
    c = config(srv.url, "anthropic", batch=True, batch_poll_s=0.02, samples=1, max_completion_tokens=32)
    led, cache = Ledger(tmp_path / "l.sqlite"), Cache(tmp_path / "c.sqlite")
    res, s = run_judge(items(20, "e"), EMScorer(), c, cache, led, run="e", progress=False)
    failed = [r for r in res if r.status == "failed"]
    assert failed and s.ok == 20 - len(failed)
    assert {r.reason.split(":")[0] for r in failed} == {"batch"}
    assert any("errored" in r.reason for r in failed) and any("expired" in r.reason for r in failed)
    with pytest.raises(ItemsFailed):
        check_complete(s)
    billed = srv.stats()["batch_billed_total"]
    assert len(ledger_rows(led, "e")) == billed  # only succeeded results are billed

    srv.reset(**QUIET)
    res2, s2 = run_judge(items(20, "e"), EMScorer(), c, cache, led, run="e", progress=False)
    assert s2.ok == 20 and srv.stats()["batches_created"] == 1
    assert s2.batches[0]["requests"] < 40  # only what the first run left unanswered

    # a cap below the batch's worst case: nothing is submitted, every item counted as not sent
    srv.reset(**QUIET)
    res3, s3 = run_judge(items(5, "cap"), EMScorer(), c, cache, led, budget_usd=1e-6, run="cap", progress=False)
    assert srv.stats()["batches_created"] == 0 and s3.budget_stopped and s3.remaining == 5
    with pytest.raises(BudgetStop):
        check_complete(s3)


def test_batch_resumes_by_id_after_kill_9_without_paying_twice(srv, tmp_path):
    srv.reset(**QUIET | dict(batch_polls=60, api_key=SECRET))
    conf = tmp_path / "judge.yaml"
    conf.write_text(yaml.safe_dump({
        "model": "judge-m", "cache_path": str(tmp_path / "cache.sqlite"), "batch_poll_s": 0.05,
        "scoring": "logprobs",
        "endpoints": [{"name": "fake", "base_url": srv.url, "api_key_env": "FAKE_BATCH_KEY", "usd_per_m_in": 1.0,
                       "usd_per_m_out": 4.0}]}))
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in items(8, "k")))
    cmd = [sys.executable, "bootstrap.py", "judge", str(inp), "--config", str(conf), "--out", str(tmp_path / "o.jsonl"),
           "--data-root", str(tmp_path / "data"), "--no-progress", "--run", "k", "--batch"]
    env = {**os.environ, "FAKE_BATCH_KEY": SECRET}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:  # the batch is out and its id stored: kill the process while it polls
        if "submitted" in line:
            time.sleep(0.3)
            p.send_signal(signal.SIGKILL)
            break
    p.wait(30)
    assert p.returncode == -signal.SIGKILL and srv.stats()["batches_created"] == 1

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed" in r.stdout + r.stderr
    st = srv.stats()
    assert st["batches_created"] == 1 and st["batch_billed_total"] == 16 and st["requests"] == 0
    led = Ledger(tmp_path / "data" / "runs" / "k" / "ledger.sqlite")
    assert len(ledger_rows(led, "k")) == 16  # each result billed once, by the run that downloaded it
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert {x["id"] for x in rows if x["judge_status"] == "ok"} == {f"k{i}" for i in range(8)}
    for f in (tmp_path / "data").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes()


def test_default_config_picks_openai_when_its_key_is_set_else_the_local_server(monkeypatch):
    from cai_bootstrap.judge.config import load_config
    from cai_bootstrap.judge.endpoints import choose_path, judge_model_name

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    c = load_config(None)
    assert [e.name for e in c.usable()] == ["local-vllm"] and judge_model_name(c) != c.model
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert [e.name for e in c.usable()] == ["openai"] and judge_model_name(c) == c.model == "gpt-4o-2024-08-06"
    assert choose_path(c)[0] == "logprobs"  # its tokenizer is not visible: logprobs, switched on a 400
    assert SECRET not in repr(c) and SECRET not in c.model_dump_json()
