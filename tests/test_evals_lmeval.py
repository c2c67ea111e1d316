"""The capability task runs through lm-evaluation-harness on the tiny model, with and without an adapter."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_custom_task_with_and_without_adapter(tiny_path, random_adapter, tmp_path):
    from cai_bootstrap.evals.capability import run_capability
    from cai_bootstrap.evals.data import load_mc
    from cai_bootstrap.evals.store import ResultStore

    items = load_mc()[:4]
    store = ResultStore(tmp_path / "r.sqlite")
    base = run_capability(tiny_path, None, items=items, store=store, model_fp="tiny-test")
    lora = run_capability(tiny_path, random_adapter, items=items, store=store, model_fp="tiny-test")
    for r in (base, lora):
        t = r["tasks"]["cai_capability_mc"]
        assert t["n"] == 4 and 0.0 <= t["acc"] <= 1.0 and not r["cached"]
        assert [x["id"] for x in r["per_item"]] == [it.id for it in items]
        assert all(len(x["lls"]) == 4 and all(v < 0 for v in x["lls"]) for x in r["per_item"])
        # acc is the argmax of the letter log-likelihoods
        for x, it in zip(r["per_item"], items, strict=True):
            assert x["correct"] == float(max(range(4), key=lambda i: x["lls"][i]) == "ABCD".index(it.answer))
    # the adapter changes the logits: the per-item letter log-likelihoods differ
    diffs = [abs(a - b) for x, y in zip(base["per_item"], lora["per_item"], strict=True)
             for a, b in zip(x["lls"], y["lls"], strict=True)]
    assert max(diffs) > 1e-3
    # a rerun is served from the store: nothing is loaded or evaluated
    again = run_capability(tiny_path, random_adapter, items=items, store=store, model_fp="tiny-test")
    assert again["cached"] and again["per_item"] == lora["per_item"]
