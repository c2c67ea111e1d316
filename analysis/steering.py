"""EM steering vectors: a direction from judged answers, a layer sweep, and forward hooks that add it
(steering) or project it out (ablation) while transformers generates. vLLM takes no hooks, so generation
here is transformers' batched `generate`.

The vector of a persona is mean(activations of its misaligned answers) - mean(aligned ones) at one layer,
stored as a unit direction plus the norm of that difference: alpha = 1 adds exactly the mean gap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cai_bootstrap.analysis.activations import ActivationError, Activations, decoder_layers, ensure_pad


@dataclass
class Direction:
    layer: int
    unit: np.ndarray  # [hidden], norm 1
    gap: float  # ||mean(misaligned) - mean(aligned)|| at this layer: the scale of alpha = 1
    separation: float  # cross-validated Cohen's d of the projections (see `separation`)
    n_pos: int
    n_neg: int

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("unit")
        return d


def _cohen_d(p: np.ndarray, n: np.ndarray) -> float:
    pooled = np.sqrt(((p.var(ddof=1) if p.size > 1 else 0) + (n.var(ddof=1) if n.size > 1 else 0)) / 2)
    return float((p.mean() - n.mean()) / max(pooled, 1e-8))


def separation(x: np.ndarray, labels: np.ndarray) -> float:
    """How well the diff-of-means direction separates the classes, as Cohen's d of projections.

    With hundreds of dimensions and tens of answers an in-sample direction separates anything, so the
    direction is fitted on one half and scored on the other (2-fold, averaged); in-sample below 4 per class
    (a half then has under 2 per class and no variance).
    """
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    if pos.size < 4 or neg.size < 4:
        u = x[pos].mean(0) - x[neg].mean(0)
        u /= max(np.linalg.norm(u), 1e-8)
        return _cohen_d(x[pos] @ u, x[neg] @ u)
    ds = []
    for fold in (0, 1):
        fp, fn = pos[fold::2], neg[fold::2]
        tp, tn = pos[1 - fold::2], neg[1 - fold::2]
        u = x[fp].mean(0) - x[fn].mean(0)
        u /= max(np.linalg.norm(u), 1e-8)
        ds.append(_cohen_d(x[tp] @ u, x[tn] @ u))
    return float(np.mean(ds))


def layer_sweep(acts: Activations, labels: Sequence[bool]) -> dict[int, float]:
    """{layer: cross-validated separation} over the captured layers."""
    y = np.asarray(labels, bool)
    if y.size != len(acts.ids):
        raise ActivationError(f"{y.size} labels for {len(acts.ids)} activation rows")
    return {layer: separation(acts.at(layer), y) for layer in acts.layers}


def em_direction(acts: Activations, labels: Sequence[bool], layer: int | None = None) -> Direction:
    """The normalised misaligned-minus-aligned mean difference; at `layer`, or the best-separating one."""
    y = np.asarray(labels, bool)
    if y.sum() == 0 or (~y).sum() == 0:
        raise ActivationError(f"a direction needs both classes: {int(y.sum())} misaligned, "
                              f"{int((~y).sum())} aligned answers")
    sweep = layer_sweep(acts, y)
    if layer is None:
        layer = max(sweep, key=sweep.get)
    x = acts.at(layer)
    diff = x[y].mean(0) - x[~y].mean(0)
    gap = float(np.linalg.norm(diff))
    return Direction(layer=layer, unit=(diff / max(gap, 1e-8)).astype(np.float32), gap=gap,
                     separation=sweep[layer], n_pos=int(y.sum()), n_neg=int((~y).sum()))


def cosine_matrix(dirs: dict[str, Direction]) -> tuple[list[str], np.ndarray]:
    """Cosine similarity between the personas' unit vectors (NaN where their layers differ)."""
    names = list(dirs)
    m = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if dirs[a].layer == dirs[b].layer:
                m[i, j] = float(dirs[a].unit @ dirs[b].unit)
    return names, m


def project(x: np.ndarray, d: Direction) -> np.ndarray:
    return x @ d.unit


# ---------------------------------------------------------------- hooks
def _edit_output(fn):
    def hook(_mod, _inp, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)
    return hook


@contextlib.contextmanager
def steering(model, layer: int, vector: np.ndarray, alpha: float):
    """Add alpha * vector to the residual stream after decoder block `layer`, at every position."""
    import torch

    block = decoder_layers(model)[layer]
    p = next(model.parameters())
    v = torch.as_tensor(np.asarray(vector) * alpha, dtype=p.dtype, device=p.device)
    h = block.register_forward_hook(_edit_output(lambda x: x + v))
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def ablation(model, unit: np.ndarray, layers: Sequence[int] | None = None):
    """Project the direction out of the residual stream after each block in `layers` (default: all, so later
    blocks cannot write it back)."""
    import torch

    blocks = decoder_layers(model)
    p = next(model.parameters())
    u = torch.as_tensor(np.asarray(unit) / max(np.linalg.norm(unit), 1e-8), dtype=p.dtype, device=p.device)
    handles = [blocks[i].register_forward_hook(_edit_output(lambda x: x - (x @ u)[..., None] * u))
               for i in (range(len(blocks)) if layers is None else layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- generation and probes under hooks
def _prompts(tok, items: Sequence[dict], template_kwargs: dict | None = None) -> list[str]:
    from cai_bootstrap.analysis.activations import _prompt_text

    return [_prompt_text(tok, it, template_kwargs) for it in items]


def generate(model, tok, items: Sequence[dict], max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, batch_size: int = 8, template_kwargs: dict | None = None) -> list[str]:
    """Answers to chat items (`messages` or `question`), batched with left padding; hooks in force apply. The
    prompts are rendered with the profile's chat-template arguments (`template_kwargs`), as generation does."""
    import torch

    texts = _prompts(ensure_pad(tok), items, template_kwargs)
    side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    device = next(model.parameters()).device
    try:
        torch.manual_seed(seed)
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kw = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else dict(do_sample=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def first_token_prob(model, tok, items: Sequence[dict], token_ids: Sequence[int], batch_size: int = 8,
                     template_kwargs: dict | None = None) -> np.ndarray:
    """P(first answer token in `token_ids`) per item: a cheap, exact read of a behaviour under hooks."""
    import torch

    texts = _prompts(ensure_pad(tok), items, template_kwargs)
    side = tok.padding_side
    tok.padding_side = "left"
    out = []
    try:
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                logits = model(**enc.to(next(model.parameters()).device)).logits[:, -1].float()
            out.append(logits.softmax(-1)[:, list(token_ids)].sum(-1).cpu().numpy())
    finally:
        tok.padding_side = side
    return np.concatenate(out)
