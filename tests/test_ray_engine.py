"""`--ray local`: stage generation and EM answering on Ray Data workers, each holding one of the project's vLLM
engines (engine.ray_engine), on the tiny model and 2 CPU cores."""

from __future__ import annotations

import subprocess
import time

import pytest

from cai_bootstrap.engine.types import Request, Sampling

pytest.importorskip("ray")


def test_two_replicas_answer_like_one_engine_in_request_order(vllm_engine, random_adapter):
    """Prompts split over 2 engine replicas come back as one engine answers them: same texts, request-major, with
    the adapter; each worker's engine process ends with its worker."""
    from cai_bootstrap.engine.factory import make_engine
    from cai_bootstrap.engine.ray_engine import RayEngine

    reqs = [Request.chat("Name " + "a very " * i + "small animal.") for i in range(5)]  # lengths tell them apart
    sampling = Sampling(temperature=0.9, max_tokens=10, n=2, seed=3)  # vLLM seeds each request's own generator
    before = _orphan_engines()  # earlier tests' killed runs may have left some: not this test's
    with make_engine("vllm", "tiny", ray="local", replicas=2) as eng:
        assert isinstance(eng, RayEngine)
        got = eng.generate(reqs, sampling, adapter=random_adapter)
    want = vllm_engine.generate(reqs, sampling, adapter=random_adapter)
    assert [(c.request_index, c.sample_index, c.prompt_tokens, c.text) for c in got] == \
        [(c.request_index, c.sample_index, c.prompt_tokens, c.text) for c in want]
    assert [(c.request_index, c.sample_index) for c in got] == [(i, j) for i in range(5) for j in range(2)]
    assert eng.usage[0].tokens_out == sum(c.completion_tokens for c in got)
    # each worker's engine processes end with it: none is left running on its own (an exiting one gets a moment)
    deadline = time.time() + 15
    while (left := _orphan_engines() - before) and time.time() < deadline:
        time.sleep(0.5)
    assert not left


def _orphan_engines() -> set[str]:
    """vLLM processes whose parent is gone (reparented to init), by pid."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,stat=,comm="], capture_output=True, text=True).stdout
    return {r.split()[0] for r in rows.splitlines()
            if len(r.split()) >= 4 and r.split()[1] == "1" and "VLLM" in r and not r.split()[2].startswith("Z")}


def test_a_run_and_its_em_phase_take_ray_from_the_config():
    from cai_bootstrap.engine.ray_engine import RayEngine
    from cai_bootstrap.pipeline.loop import Engines
    from cai_bootstrap.run.config import RunConfig

    cfg = RunConfig(ray="local")
    engines = Engines(cfg)
    assert isinstance(engines.get(), RayEngine) and engines.get().replicas == 1  # the tiny profile's
    engines.close()
    assert cfg.default_id() == RunConfig().default_id()  # where it runs is not what it makes
