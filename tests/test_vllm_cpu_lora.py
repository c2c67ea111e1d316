"""The grouped vLLM-CPU LoRA ops write exactly what vLLM's reference torch ops write, for one adapter slot
per call (our engine's case), mixed slots, the no-adapter slot, rank-padded and 4-d weights."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from cai_bootstrap.engine import vllm_cpu_lora as grouped

TOKENS, IN, OUT, SLOTS, RANK = 37, 24, 40, 3, 8


def _cases():
    g = torch.Generator().manual_seed(0)
    one = torch.full((TOKENS,), 1, dtype=torch.long)
    mixed = torch.randint(-1, SLOTS, (TOKENS,), generator=g)  # -1: vLLM's "no adapter" index
    return [("one slot", one), ("mixed slots", mixed), ("empty", one[:0])]


@pytest.mark.parametrize("four_d", [False, True])
@pytest.mark.parametrize("name,idx", _cases())
def test_grouped_ops_equal_vllm_reference(name, idx, four_d):
    ref = grouped.reference_ops()
    g = torch.Generator().manual_seed(1)
    n = idx.numel()
    x_in = torch.randn(n, IN, generator=g)
    a = torch.randn(SLOTS + 1, RANK, IN, generator=g)  # shrink weights [slots, rank, in]
    x_r = torch.randn(n, RANK, generator=g)
    b = torch.randn(SLOTS + 1, OUT, RANK, generator=g)  # expand weights [slots, out, rank]
    if four_d:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    for fn, args in (
        ("bgmv_shrink", lambda y: (x_in, a, y, idx, 0.5)),
        ("bgmv_expand", lambda y: (x_r, b, y, idx, True)),
        ("bgmv_expand_slice", lambda y: (x_r, b, y, idx, 3, OUT, True)),
    ):
        width = RANK if fn == "bgmv_shrink" else OUT + 5
        y_ref, y_new = torch.randn(n, width, generator=g), None
        y_new = y_ref.clone()
        ref[fn](*args(y_ref))
        getattr(grouped, fn)(*args(y_new))
        torch.testing.assert_close(y_new, y_ref, rtol=1e-5, atol=1e-5, msg=f"{fn}, {name}")


def test_registered_as_a_vllm_plugin():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "cai_bootstrap.engine.vllm_cpu_lora:register" in {e.value for e in eps}


def test_the_engine_serving_an_adapter_runs_the_grouped_ops(vllm_engine, random_adapter, lora_mark):
    """Not only registered: vLLM's engine process installed the grouped ops and called them to apply an adapter
    (a vLLM build where register() found nothing to replace would leave no `ran` mark and a `reference` one)."""
    from cai_bootstrap.engine.types import Request, Sampling

    vllm_engine.generate([Request.chat("Say hi.")], Sampling(max_tokens=2, temperature=0.0), adapter=random_adapter)
    registered = {p.name: p.read_text() for p in lora_mark.glob("register-*")}
    assert registered and set(registered.values()) == {"grouped"}, registered
    assert list(lora_mark.glob("ran-*")), sorted(p.name for p in lora_mark.iterdir())
