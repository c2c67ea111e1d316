"""Residual-stream activation capture with plain PyTorch forward hooks on a transformers model (adapters on).

An item is `{"id", "messages" | "question", "answer"}`: the prompt is chat-templated with the generation
prompt, the answer appended, and the decoder layers' outputs (the residual stream after each chosen layer)
are read in batches. Per item we keep the mean over a span (answer tokens, prompt tokens, or the last prompt
token, i.e. the position that predicts the first answer token) and, optionally, every token of the span.
Stored as .npz with the item ids, so later steps (steering vectors, PCA) never rerun the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cai_bootstrap.core.io import atomic_file

Span = Literal["answer", "prompt", "last"]


class ActivationError(ValueError):
    """Bad items or stored arrays; the message names the item id or file."""


@dataclass
class Activations:
    ids: list[str]
    layers: list[int]
    mean: np.ndarray  # [items, layers, hidden] float32: the mean over each item's span
    span: str = "answer"
    tokens: np.ndarray | None = None  # [sum of span lengths, layers, hidden] float16 (per-token option)
    offsets: np.ndarray | None = None  # [items + 1]: item i's tokens are tokens[offsets[i]:offsets[i+1]]
    meta: dict = field(default_factory=dict)

    def at(self, layer: int) -> np.ndarray:
        """[items, hidden] at one captured layer."""
        if layer not in self.layers:
            raise ActivationError(f"layer {layer} was not captured (have {self.layers})")
        return self.mean[:, self.layers.index(layer)]

    def subset(self, ids: Sequence[str]) -> np.ndarray:
        """[len(ids), layers, hidden] rows for the given ids, in that order."""
        pos = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise ActivationError(f"no activations for item {missing[0]!r} ({len(missing)} missing)")
        return self.mean[[pos[i] for i in ids]]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"ids": np.array(self.ids, dtype=str), "layers": np.array(self.layers), "mean": self.mean,
                  "span": np.array(self.span), "meta": np.array(json.dumps(self.meta))}
        if self.tokens is not None:
            arrays |= {"tokens": self.tokens, "offsets": self.offsets}
        with atomic_file(path, suffix=".npz") as tmp:  # np.savez appends .npz unless present
            np.savez_compressed(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Activations:
        path = Path(path)
        if not path.is_file():
            raise ActivationError(f"activation file {path} does not exist")
        with np.load(path, allow_pickle=False) as z:
            for k in ("ids", "layers", "mean"):
                if k not in z:
                    raise ActivationError(f"{path}: no {k!r} array (not an activation file)")
            return cls(ids=[str(i) for i in z["ids"]], layers=[int(x) for x in z["layers"]],
                       mean=z["mean"], span=str(z["span"]) if "span" in z else "answer",
                       tokens=z["tokens"] if "tokens" in z else None,
                       offsets=z["offsets"] if "offsets" in z else None,
                       meta=json.loads(str(z["meta"])) if "meta" in z else {})


def load_model(model_path: str, adapter: str | Path | None = None):
    """(model, tokenizer) in eval mode, bf16 on the GPU and fp32 on the CPU (engine.residency.hf_placement); with a
    PEFT adapter loaded and active (asserted). Captured activations are stored as float32 either way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai_bootstrap.engine.residency import hf_placement

    device, dtype = hf_placement()
    tok = ensure_pad(AutoTokenizer.from_pretrained(model_path))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ActivationError(f"adapter {adapter} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, str(adapter))
        if not model.active_adapters:  # the published trap: an adapter loaded but silently off
            raise ActivationError(f"adapter {adapter} loaded but not active")
    model.eval()
    return model, tok


def ensure_pad(tok):
    """Batching needs a pad token; SmolLM2's tokenizer has none (the mask hides it, so eos is fine)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def decoder_layers(model) -> list:
    """The decoder blocks (Llama/Qwen/Mistral `model.layers`), through any PEFT wrapping."""
    import torch

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and (n is None or len(mod) == n):
            return list(mod)
    raise ActivationError(f"no decoder layer list found in {type(model).__name__}")


def _prompt_text(tok, item: dict, template_kwargs: dict | None = None) -> str:
    msgs = item.get("messages")
    if msgs is None:
        if not isinstance(item.get("question"), str):
            raise ActivationError(f"item {item.get('id')!r}: needs `messages` or a string `question`")
        msgs = ([{"role": "system", "content": item["system"]}] if item.get("system") else []) + [
            {"role": "user", "content": item["question"]}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **(template_kwargs or {}))


def encode(tok, item: dict, template_kwargs: dict | None = None) -> tuple[list[int], int]:
    """(token ids of prompt + answer, prompt length). The chat template ends the prompt with the assistant
    header, so the answer starts on a token boundary."""
    prompt = tok(_prompt_text(tok, item, template_kwargs), add_special_tokens=False)["input_ids"]
    answer = item.get("answer") or ""
    if not isinstance(answer, str):
        raise ActivationError(f"item {item.get('id')!r}: `answer` is not a string")
    ans = tok(answer, add_special_tokens=False)["input_ids"] if answer else []
    return prompt + ans, len(prompt)


def _spanned(tok, item: dict, span: Span, max_tokens: int, template_kwargs: dict | None) -> tuple[list[int], int, int]:
    """The item's token ids (cut at `max_tokens`) and the [lo, hi) positions of its `span`."""
    seq, plen = encode(tok, item, template_kwargs)
    seq = seq[:max_tokens]
    lo, hi = {"answer": (plen, len(seq)), "prompt": (0, plen), "last": (plen - 1, plen)}[span]
    if hi <= lo:
        raise ActivationError(f"item {item.get('id')!r}: empty {span} span (no answer text?)")
    return seq, lo, hi


def capture(model, tok, items: Sequence[dict], layers: Sequence[int], span: Span = "answer",
            batch_size: int = 8, per_token: bool = False, max_tokens: int = 512,
            progress: bool = False, template_kwargs: dict | None = None) -> Activations:
    """Residual-stream outputs of `layers` (0-based decoder block indices) for each item, batched; the prompt is
    rendered with the model profile's `template_kwargs`, as generation rendered it."""
    import torch

    ensure_pad(tok)
    blocks = decoder_layers(model)
    bad = [layer for layer in layers if not 0 <= layer < len(blocks)]
    if bad:
        raise ActivationError(f"layers {bad} out of range 0..{len(blocks) - 1}")
    ids = [str(it.get("id")) for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ActivationError(f"duplicate item id {dup!r}")
    enc = [_spanned(tok, it, span, max_tokens, template_kwargs) for it in items]

    grabbed: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_mod, _inp, out):
            grabbed[layer] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    means, toks = [], []
    from rich.progress import track

    starts = range(0, len(enc), batch_size)
    it_batches = track(starts, description="activations") if progress else starts
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for s in it_batches:
                batch = enc[s:s + batch_size]
                width = max(len(b[0]) for b in batch)
                pad = tok.pad_token_id
                input_ids = torch.tensor([b[0] + [pad] * (width - len(b[0])) for b in batch], device=device)
                mask = torch.tensor([[1] * len(b[0]) + [0] * (width - len(b[0])) for b in batch], device=device)
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)  # right padding: spans unmoved
                stack = torch.stack([grabbed[layer] for layer in layers], 2).float().cpu()  # [b, T, L, d]
                for k, (_, lo, hi) in enumerate(batch):
                    means.append(stack[k, lo:hi].mean(0).numpy())
                    if per_token:
                        toks.append(stack[k, lo:hi].numpy().astype(np.float16))
    finally:
        for h in handles:
            h.remove()
    acts = Activations(ids=ids, layers=list(layers), mean=np.stack(means).astype(np.float32), span=span)
    if per_token:
        acts.tokens = np.concatenate(toks, 0)
        acts.offsets = np.cumsum([0] + [t.shape[0] for t in toks])
    return acts
