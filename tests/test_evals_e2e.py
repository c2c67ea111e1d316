"""`eval` end to end on the tiny profile: two stand-in stage adapters, a real HTTP judge (FaultServer with
A/B logprob tables for the pairwise prompt), the tiny guard, lm-eval; the rerun (through the CLI) is
served entirely from the caches: zero engine, judge, guard and lm-eval calls."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

pytestmark = pytest.mark.slow


def _ab_server():
    from tests.fault_server import FaultApp, FaultServer

    class ABApp(FaultApp):
        @staticmethod
        def _completion(body, content):
            if "Reply with one letter: A or B" not in content:
                return FaultApp._completion(body, content)
            h = int(hashlib.sha256(content.encode()).hexdigest(), 16)
            pa = 0.15 + 0.7 * (h % 1000) / 999  # deterministic per prompt, either side
            table = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
                     for t, p in (("A", pa), ("B", 1 - pa))]
            return json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": table[0]["token"]}, "finish_reason": "stop",
                 "logprobs": {"content": [{**table[0], "top_logprobs": table}]}}],
                "usage": {"prompt_tokens": len(content) // 4, "completion_tokens": 1}})

    from tests.fault_server import Faults

    srv = FaultServer(Faults(api_key="test-key-evals"))
    srv.fa = ABApp(srv.fa.faults)
    return srv


def _adapter(tiny_path, out, seed):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False)).save_pretrained(out)


def test_eval_end_to_end_and_cached_rerun(tmp_path, monkeypatch, tiny_path, random_adapter, hf_engine):
    from typer.testing import CliRunner

    from cai_bootstrap.bootstrap import app
    from cai_bootstrap.evals.run import EvalOptions, evaluate
    from cai_bootstrap.run.config import RunConfig, save_config

    ckpt = tmp_path / "checkpoints" / "hhh"
    shutil.copytree(random_adapter, ckpt / "stage1")
    _adapter(tiny_path, ckpt / "stage2", seed=1)
    cfg = RunConfig(personas=["hhh"], profile="tiny", engine="hf", data_root=str(tmp_path / "data"),
                    ckpt_root=str(tmp_path / "checkpoints"))
    run_id = "evaltest"
    save_config(cfg, run_id)
    monkeypatch.setenv("EVALS_TEST_JUDGE_KEY", "test-key-evals")
    with _ab_server() as srv:
        jc = tmp_path / "judge.yaml"
        jc.write_text(json.dumps({"model": "fault-judge", "endpoints": [{
            "name": "fault", "base_url": srv.url, "api_key_env": "EVALS_TEST_JUDGE_KEY", "rpm": 6000,
            "max_concurrent": 8, "usd_per_m_in": 1.0, "usd_per_m_out": 2.0}],
            "retry": {"max_attempts": 2, "deadline_s": 30}}))
        opts = EvalOptions(stages=[0, 1, 2], n_general=1, n_kind=1, n_safety=1, mc_limit=3, max_tokens=8,
                           guard="tiny")
        logs: list[str] = []
        calls0 = hf_engine.calls
        # the run's cap is checked against the answers' engine estimate before any is generated
        from cai_bootstrap.core.errors import BudgetStop

        with pytest.raises(BudgetStop, match="hhh evaluation answers"):
            evaluate("hhh", run_id, cfg.model_copy(update={"gpu_hour_usd": 1e6}), opts, judge_config=jc,
                     budget_usd=0.01, engine=hf_engine, log=logs.append, progress=False)
        assert hf_engine.calls == calls0 and srv.stats()["requests"] == 0
        s = evaluate("hhh", run_id, cfg, opts, judge_config=jc, budget_usd=1.0, engine=hf_engine,
                     log=logs.append, progress=False)
        assert any(line.startswith("estimate:") for line in logs)
        assert hf_engine.calls - calls0 == 3 == s["engine_calls"]  # one batched call per stage
        assert s["guard_calls"] == 3 and s["lm_eval_runs"] == 3
        sent = srv.stats()["requests"]
        # pairs: stage 1 vs 0 (2 prompts), stage 2 vs 1 and vs 0 (2 each), 2 orders; adherence 1+2+2
        assert sent == 2 * 6 + 5 == s["judge_requests_sent"]
        ps = s["per_stage"]
        for k in ("1", "2"):
            for side in ("vs_previous", "vs_base"):
                w = ps[k]["pairwise"][side]
                assert w["n"] == 2 and w["invalid"] == 0 and w["wins"] + w["losses"] + w["ties"] == 2
                assert w["win_rate"]["value"] == pytest.approx((w["wins"] + w["ties"] / 2) / 2)
                assert w["len_candidate"] is not None
            assert ps[k]["capability"]["change_vs_base"]["n"] == 3
        assert ps["2"]["pairwise"]["vs_previous"]["vs"] == 1 and ps["2"]["pairwise"]["vs_base"]["vs"] == 0
        assert ps["0"]["adherence"]["n"] == 1 and ps["1"]["adherence"]["n"] == 2
        assert 1 <= ps["1"]["adherence"]["value"] <= 10
        for k in ("0", "1", "2"):
            assert ps[k]["safety"]["unsafe_rate"]["n"] == 1 and ps[k]["safety"]["over_refusal_rate"]["n"] == 1
            assert ps[k]["capability"]["accuracy"]["n"] == 3
            assert ps[k]["cost"]["usd"] >= ps[k]["cost"]["judge_usd"] >= 0
        assert ps["1"]["cost"]["judge_usd"] > 0
        run_path = tmp_path / "data" / "runs" / run_id
        for k in (0, 1, 2):
            stored = json.loads((run_path / "eval" / "hhh" / f"stage{k}.json").read_text())
            assert stored["stage"] == k and len(stored["answers"]) == 1 + 2 + 2
        sec = (run_path / "report_sections" / "20-stage-eval-hhh.md").read_text()
        assert "![stage evaluation](stage_eval_hhh.png)" in sec and sec.count("\n| ") >= 4
        assert (run_path / "stage_eval_hhh.png").stat().st_size > 10_000

        # rerun through the CLI command: everything from the caches
        res = CliRunner().invoke(app, ["eval", "--persona", "hhh", "--run", run_id, "--stages", "0-2",
                                       "--judge-config", str(jc), "--n-general", "1", "--n-kind", "1",
                                       "--n-safety", "1", "--mc-limit", "3", "--max-tokens", "8",
                                       "--guard", "tiny", "--engine", "hf", "--budget-usd", "1", "--no-progress",
                                       "--data-root", str(tmp_path / "data")])
        assert res.exit_code == 0, res.output
        s2 = json.loads((run_path / "eval" / "hhh" / "summary.json").read_text())
        assert (s2["engine_calls"], s2["judge_requests_sent"], s2["guard_calls"], s2["lm_eval_runs"]) == (0, 0, 0, 0)
        assert srv.stats()["requests"] == sent  # not one more judge request reached the server
        assert s2["per_stage"]["2"]["pairwise"] == ps["2"]["pairwise"]
        assert s2["per_stage"]["1"]["capability"]["accuracy"] == ps["1"]["capability"]["accuracy"]
        assert s2["per_stage"]["1"]["cost"]["judge_usd"] == 0.0  # cached judge calls are never billed
        assert "estimate:" in res.output
