"""Exact stacking of two PEFT LoRA adapters into ONE LoRA adapter (served by vLLM: one LoRA per request).

For every target module, delta = s1·B1·A1 + s2·B2·A2 = [s1·B1, s2·B2] · [A1; A2], so the stacked adapter has
A = [A1; A2; 0], B = [s1·B1, s2·B2, 0] and scaling 1 (lora_alpha = r, no rsLoRA). The rank r1+r2 is rounded up
to a rank vLLM accepts, with zero rows/columns (which add nothing). A module targeted by only one adapter gets
zeros for the other's block. s = alpha/r, or alpha/sqrt(r) with rsLoRA, per module (rank/alpha patterns).
Written by hand because PEFT's `add_weighted_adapter(combination_type="cat")` needs both adapters loaded on
the base model and is known to be wrong for rsLoRA in some versions; this is a pure tensor operation.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

from cai_bootstrap.core.io import atomic_dir, atomic_write_json
from cai_bootstrap.run.config import RunConfig
from cai_bootstrap.run.layout import Layout
from cai_bootstrap.run.recipe import introspects
from cai_bootstrap.train.common import TrainError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def vllm_rank(r: int) -> int:
    for v in VLLM_RANKS:
        if v >= r:
            return v
    raise TrainError(f"stacked rank {r} is over vLLM's largest LoRA rank {VLLM_RANKS[-1]}")


def served_rank(profile: str, introspect: bool = False) -> int:
    """The LoRA rank vLLM must serve in a run: a persona's preference adapter, its introspection adapter where
    its recipe has one (run.recipe), and the EM adapter, stacked (the ranks add), rounded up to a rank vLLM
    accepts. vLLM pads every adapter to its max rank, so a run asks for no more than it serves."""
    from cai_bootstrap.train.config import dpo_defaults, em_defaults, introspect_defaults

    rank = dpo_defaults(profile).rank + em_defaults(profile).rank
    return vllm_rank(rank + (introspect_defaults(profile).rank if introspect else 0))


def served_lora_rank(cfg: RunConfig) -> int:
    """The largest stacked adapter a run's engine serves: larger where one of its recipes introspects, since that
    persona is two adapters before the EM one is stacked on."""
    return served_rank(cfg.profile, any(introspects(a) for a in cfg.personas))


def _read(adapter: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    adapter = Path(adapter)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise TrainError(f"adapter {adapter} has no adapter_config.json (missing or not a PEFT adapter)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise TrainError(f"adapter {adapter} is {cfg.get('peft_type')}, not LoRA: only LoRA adapters stack")
    if cfg.get("use_dora"):
        raise TrainError(f"adapter {adapter} uses DoRA: its magnitude vector makes the delta non-additive, "
                         "so it cannot be stacked exactly")
    if cfg.get("lora_bias"):
        raise TrainError(f"adapter {adapter} has lora_bias=True: stacking supports bias-free LoRA only")
    if cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
        raise TrainError(f"adapter {adapter} saves full modules/tokens ({cfg.get('modules_to_save')}): "
                         "only pure LoRA deltas stack")
    st = adapter / "adapter_model.safetensors"
    if not st.is_file():
        raise TrainError(f"adapter {adapter} has no adapter_model.safetensors")
    tensors = load_file(str(st))
    extra = [k for k in tensors if not _KEY.match(k)]
    if extra:
        raise TrainError(f"adapter {adapter} holds non-LoRA tensors, e.g. {extra[0]}: cannot stack")
    return cfg, tensors


def _scale(cfg: dict, module: str, r: int) -> float:
    alpha = cfg.get("lora_alpha", 8)
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):  # PEFT's own pattern-key rule
            alpha = a
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _modules(tensors: dict) -> dict[str, tuple]:
    """{module: (A, B)}, without the all-zero rank components a stacked adapter was padded with (they add
    nothing), so stacking a stack does not count its padding: 64 + 32 padded to 128, plus 32, is 128, not 160."""
    mods: dict[str, dict] = {}
    for k, v in tensors.items():
        m = _KEY.match(k)
        mods.setdefault(m["module"], {})[m["ab"]] = v
    for name, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise TrainError(f"LoRA module {name} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
    out = {}
    for n, ab in mods.items():
        A, B = ab["A"], ab["B"]
        used = (A != 0).any(1) | (B != 0).any(0)  # a trained or fresh LoRA's A rows are never all zero
        # the scale stays the adapter's own: alpha over its rank as configured, padding included
        out[n] = (A[used], B[:, used], A.shape[0]) if not used.all() and used.any() else (A, B, A.shape[0])
    return out


def _same_base(a: Path, ca: dict, b: Path, cb: dict) -> None:
    fa, fb = (json.loads((p / "manifest.json").read_text()).get("base_fingerprint")
              if (p / "manifest.json").is_file() else None for p in (a, b))
    if fa and fb:
        if fa != fb:
            raise TrainError(f"adapters {a} and {b} are on different base models (fingerprints {fa} vs {fb})")
        return
    na, nb = ca.get("base_model_name_or_path"), cb.get("base_model_name_or_path")
    if na and nb and Path(na).expanduser().resolve() != Path(nb).expanduser().resolve() and na != nb:
        raise TrainError(f"adapters {a} and {b} are on different base models ({na!r} vs {nb!r})")


def stack_adapters(a: str | Path, b: str | Path, out: str | Path, round_to_vllm: bool = True) -> Path:
    """Write ONE LoRA adapter at `out` equal to adapter a + adapter b (both active) on their shared base."""
    from safetensors.torch import save_file

    from cai_bootstrap.engine.base import adapter_hash

    a, b, out = Path(a), Path(b), Path(out)
    ca, ta = _read(a)
    cb, tb = _read(b)
    _same_base(a, ca, b, cb)
    ma, mb = _modules(ta), _modules(tb)
    ranks = {n: (ma[n][0].shape[0] if n in ma else 0) + (mb[n][0].shape[0] if n in mb else 0)
             for n in set(ma) | set(mb)}
    r_sum = max(ranks.values())
    rank = vllm_rank(r_sum) if round_to_vllm else r_sum
    tensors = {}
    for name in sorted(ranks):
        A, B = _stacked_module(name, rank, [(ma, ca, a), (mb, cb, b)])
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = A, B
    targets = sorted({n.rsplit(".", 1)[-1] for n in ranks})
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        # sorted keys, as before: the config's bytes are part of the adapter's hash (engine.base.adapter_hash)
        atomic_write_json(tmp / "adapter_config.json", dict(sorted(_stacked_config(ca, rank, targets).items())))
        atomic_write_json(tmp / "stack.json", {
            "sources": [{"path": str(a), "hash": adapter_hash(a), "r": ca.get("r"), "rslora": ca.get("use_rslora")},
                        {"path": str(b), "hash": adapter_hash(b), "r": cb.get("r"), "rslora": cb.get("use_rslora")}],
            "rank_sum": r_sum, "rank": rank, "target_modules": targets})
        for p in (a, b):  # carry the base fingerprint so later checks know the base
            if (p / "manifest.json").is_file():
                fp = json.loads((p / "manifest.json").read_text()).get("base_fingerprint")
                if fp:
                    atomic_write_json(tmp / "manifest.json", {"kind": "stack", "base_fingerprint": fp})
                    break
    return out


def _stacked_module(name: str, rank: int, sources: list[tuple[dict, dict, Path]]):
    """One module's stacked (A, B): the sources' A rows and scaled B columns side by side, zero-padded to `rank`."""
    import torch

    blocks_a, blocks_b = [], []
    shape_in = shape_out = None
    for mods, cfg, src in sources:
        if name not in mods:
            continue
        A, B, r = mods[name][0].float(), mods[name][1].float(), mods[name][2]
        if shape_in is not None and (A.shape[1], B.shape[0]) != (shape_in, shape_out):
            raise TrainError(f"module {name}: adapter {src} has shape in={A.shape[1]}, out={B.shape[0]}, "
                             f"the other in={shape_in}, out={shape_out}: different base models")
        shape_in, shape_out = A.shape[1], B.shape[0]
        blocks_a.append(A)
        blocks_b.append(B * _scale(cfg, name, r))
    pad = rank - sum(x.shape[0] for x in blocks_a)
    A = torch.cat([*blocks_a, torch.zeros(pad, shape_in)], 0)
    B = torch.cat([*blocks_b, torch.zeros(shape_out, pad)], 1)
    return A.contiguous(), B.contiguous()


def _stacked_config(ca: dict, rank: int, targets: list[str]) -> dict:
    """The stacked adapter's PEFT config: rank `rank`, scaling 1 (the sources' scalings are folded into B)."""
    return {
        **{k: v for k, v in ca.items() if k in ("base_model_name_or_path", "task_type", "peft_type",
                                                "revision", "fan_in_fan_out")},
        "peft_type": "LORA",
        "task_type": ca.get("task_type") or "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # scaling 1: the scalings are folded into B
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "target_modules": targets,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


Toggle = Literal["none", "persona", "em", "both"]


def adapter_for(toggle: Toggle, persona: str | Path | None, em: str | Path | None,
                cache: str | Path | None = None) -> Path | None:
    """The adapter dir to serve for an ablation arm: None (bare base), the persona, the EM adapter, or both
    stacked (built once per pair of adapter hashes under `cache`, default checkpoints/stacked)."""
    from cai_bootstrap.engine.base import adapter_hash

    if toggle == "none":
        return None
    need = {"persona": [persona], "em": [em], "both": [persona, em]}.get(toggle)
    if need is None:
        raise TrainError(f"unknown adapter toggle {toggle!r}: use none, persona, em or both")
    if any(p is None for p in need):
        raise TrainError(f"toggle {toggle!r} needs {'both adapters' if toggle == 'both' else f'the {toggle} adapter'}")
    if toggle != "both":
        return Path(need[0])
    cache = Path(cache) if cache is not None else Layout().stacked
    out = cache / f"{adapter_hash(persona)}+{adapter_hash(em)}"
    if not (out / "adapter_config.json").is_file():
        stack_adapters(persona, em, out)
    return out


def served_adapter(persona_adapter: str | Path | None, em_dir: str | Path | None, stacked: Path) -> Path | None:
    """The one adapter vLLM serves for an EM arm at a checkpoint: the persona adapter alone before EM training
    (`em_dir` None), the EM adapter alone for the base arm (no persona), else persona ⊕ EM stacked exactly
    (cached under `stacked`, the layout's, by the two adapters' content hashes)."""
    if em_dir is None:
        return adapter_for("persona", persona_adapter, None) if persona_adapter else None
    if persona_adapter is None:
        return Path(em_dir)
    return adapter_for("both", persona_adapter, em_dir, cache=stacked)


def lora_b_norm(adapter: str | Path) -> float:
    """Frobenius norm of all an adapter's lora_B matrices together: it grows from 0 (PEFT initialises B to 0)
    as the adapter learns, and the EM transition shows in it at about the step it shows in the answers."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    return float(sum(float((t.float() ** 2).sum()) for k, t in tensors.items() if ".lora_B." in k) ** 0.5)
