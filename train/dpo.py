"""Per-stage preference LoRA adapters with TRL 1.15 + PEFT: `DPOTrainer`, or `ORPOTrainer` (trl.experimental)
when the config's `loss` is "orpo" (no reference model; same adapter layout and manifest).

Stage k starts from stage k-1's adapter weights (loaded trainable as the "default" adapter).

The DPO reference, documented choice: with a parent adapter and no explicit `ref_model`, TRL 1.15 copies the
loaded adapter into a frozen adapter named "ref" and computes the reference log-probs with it active. So the
reference of stage k is the stage k-1 model, the policy that generated stage k's data (iterative DPO), and
the KL anchor moves with the stages instead of pulling every stage back to the bare base. Stage 1 (no
parent) gets a fresh adapter and TRL disables adapters for the reference: the base model. We save only the
"default" adapter, never "ref".
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_bootstrap.core.io import atomic_write_json
from cai_bootstrap.engine.models import with_template_kwargs
from cai_bootstrap.train.common import (
    JsonlLog,
    TrainError,
    adapter_tensors,
    base_identity,
    check_adapter_base,
    device_kind,
    finish_adapter,
    load_base,
    load_tokenizer,
    quiet_trainer,
    release_memory,
    run_facts,
    select_backend,
    tensors_hash,
    train_resuming,
    trainer_args,
)
from cai_bootstrap.train.config import DPOTrainConfig, dpo_defaults
from cai_bootstrap.train.distributed import frozen_adapters_in, is_main, sharded, shared_resumable_dir

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(data: Any, name: str | None = None):
    """A pair dataset from a `save_to_disk` dir (or a Dataset), validated: prompt/chosen/rejected as chat messages
    (instruct models), or as text throughout (a base model's transcript, which TRL trains without a template)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if isinstance(data, Dataset):
        ds, name = data, name or "<in-memory dataset>"
    else:
        path = Path(data)
        name = name or str(path)
        if not path.exists():
            raise TrainError(f"pair dataset {name} does not exist (expected an HF dataset saved with save_to_disk)")
        try:
            ds = load_from_disk(str(path))
        except Exception as e:
            if _saved_empty(path):  # datasets 4.8 cannot reload a 0-row save_to_disk (no shards)
                raise TrainError(f"pair dataset {name} is empty: no preference pairs to train on") from None
            raise TrainError(f"pair dataset {name} cannot be loaded with datasets.load_from_disk: {e}") from e
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise TrainError(f"pair dataset {name} is a DatasetDict without a 'train' split ({list(ds)})")
            ds = ds["train"]
    missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise TrainError(f"pair dataset {name} lacks column(s) {', '.join(missing)} "
                         f"(has {', '.join(ds.column_names) or 'none'}; needs {', '.join(PAIR_COLUMNS)})")
    if len(ds) == 0:
        raise TrainError(f"pair dataset {name} is empty: no preference pairs to train on")
    text = isinstance(ds[0]["prompt"], str)  # a base model's pairs: its generation transcript, no chat template
    for i, row in enumerate(ds):
        for col in PAIR_COLUMNS:
            v = row[col]
            if text and not (isinstance(v, str) and v.strip()):
                raise TrainError(f"pair dataset {name}, row {i}, column {col!r}: expected non-empty text like row "
                                 f"0's prompt, got {str(v)[:80]!r}")
            if not text and not (isinstance(v, list) and v and all(isinstance(m, dict) and "role" in m and
                                                                   "content" in m for m in v)):
                raise TrainError(f"pair dataset {name}, row {i}, column {col!r}: expected a non-empty list of "
                                 f"{{role, content}} messages, got {str(v)[:80]!r}")
        if not text and (row["chosen"][-1]["role"] != "assistant" or row["rejected"][-1]["role"] != "assistant"):
            raise TrainError(f"pair dataset {name}, row {i}: chosen/rejected must end with an assistant message")
    return ds.select_columns(list(PAIR_COLUMNS))


def _saved_empty(path: Path) -> bool:
    state = path / "state.json"
    try:
        return state.is_file() and json.loads(state.read_text()).get("_data_files") == []
    except ValueError:
        return False


def dataset_hash(ds) -> str:
    import hashlib

    h = hashlib.sha256()
    for row in ds:
        h.update(json.dumps([row[c] for c in PAIR_COLUMNS], sort_keys=True).encode())
    return h.hexdigest()[:16]


def finished(out: Path) -> dict | None:
    """The manifest of a finished run at `out`, or None."""
    man = Path(out) / "manifest.json"
    return json.loads(man.read_text()) if man.is_file() else None


def reusable(out: Path, ds_hash: str, parent_hash: str | None, cfg: DPOTrainConfig, fingerprint: str) -> dict | None:
    """The manifest of a finished run at `out` made from the same dataset, parent, config and base, or None.
    The pipeline asks this before starting any training, so a rerun pays for nothing."""
    prev = finished(out)
    same = prev is not None and prev.get("dataset_hash") == ds_hash and prev.get("parent_adapter_hash") == parent_hash \
        and prev.get("config") == cfg.model_dump() and prev.get("base_fingerprint") == fingerprint
    return prev if same else None


def _inputs(data: Any, profile: str, parent: str | Path | None, model_path: str | None):
    """The pairs (checked, with the template's kwargs), their hash, the base's path and fingerprint, and the parent
    adapter's hash (checked to be of the same base)."""
    ds = load_pairs(data)
    ds_hash = dataset_hash(ds)
    model_path, fingerprint = base_identity(profile, model_path)
    parent_hash = None
    if parent is not None:
        from cai_bootstrap.engine.base import adapter_hash

        check_adapter_base(Path(parent), model_path, fingerprint, what="parent adapter")
        parent_hash = adapter_hash(parent)
    return with_template_kwargs(ds, profile), ds_hash, model_path, fingerprint, parent_hash


def _backend(device: str, cfg: DPOTrainConfig, parent: str | Path | None) -> tuple[str, str]:
    backend, why = select_backend(device, cfg.load_in_4bit, cfg.use_unsloth)
    if backend == "unsloth" and parent is not None:
        # unsloth builds its own PEFT wrapper; continuing a saved adapter is done with plain PEFT on 4-bit.
        backend, why = "trl+peft-qlora", why + "; parent adapter given: QLoRA via PEFT instead of unsloth"
    return backend, why


def train_dpo(
    data: Any,
    out: str | Path,
    cfg: DPOTrainConfig | None = None,
    profile: str = "tiny",
    parent: str | Path | None = None,
    model_path: str | None = None,
    callbacks: Sequence[Any] = (),
    force: bool = False,
) -> dict:
    """Train one stage's DPO adapter in this process; returns its manifest. A finished run with the same
    dataset, parent and config is reused (no second payment) unless `force`."""
    import torch

    from cai_bootstrap.train import cpu_kernels

    cpu_kernels.install()
    cfg = cfg or dpo_defaults(profile)
    out = Path(out)
    ds, ds_hash, model_path, fingerprint, parent_hash = _inputs(data, profile, parent, model_path)
    if not force and (prev := reusable(out, ds_hash, parent_hash, cfg, fingerprint)):
        return prev

    device = device_kind()
    backend, why = _backend(device, cfg, parent)
    t0 = time.time()
    tok = load_tokenizer(model_path)
    torch.manual_seed(cfg.seed)
    model = _policy(cfg, model_path, backend, parent)

    key = {"dataset_hash": ds_hash, "parent_adapter_hash": parent_hash, "config": cfg.model_dump(),
           "base_fingerprint": fingerprint, "backend": backend}
    with shared_resumable_dir(out, key, fresh=force) as tmp:  # --force retrains from step 0
        log = JsonlLog(tmp / "train_log.jsonl")
        fresh = parent is None and backend != "unsloth"
        trainer = _trainer(cfg, model, ds, tok, trainer_args(cfg, tmp, device, backend), [log, *callbacks],
                           cfg.peft_config() if fresh else None)
        quiet_trainer(trainer)
        if sharded():
            frozen_adapters_in(trainer.model, torch.bfloat16)
        init_hash = tensors_hash(adapter_tensors(trainer.model, "default"))
        ref_kind = ("none (ORPO)" if cfg.loss == "orpo" else "parent adapter (frozen copy 'ref')"
                    if "ref" in trainer.model.peft_config else "base model")
        result, resumed_from = train_resuming(trainer, "default", tmp, log)
        finish_adapter(trainer, "default", tmp)
        manifest = {
            "kind": cfg.loss, "dataset": str(data) if not hasattr(data, "column_names") else "<in-memory>",
            "dataset_hash": ds_hash, "rows": len(ds), "profile": profile, "base_model": model_path,
            "base_fingerprint": fingerprint, "parent_adapter": str(parent) if parent else None,
            "parent_adapter_hash": parent_hash, "init_adapter_hash": init_hash, "reference": ref_kind,
            "resumed_from_step": resumed_from, **run_facts(cfg, result, t0, device, backend, why),
        }
        if is_main():
            atomic_write_json(tmp / "manifest.json", manifest)
    del trainer, model
    release_memory()
    return manifest


def _policy(cfg: DPOTrainConfig, model_path: str, backend: str, parent: str | Path | None):
    """The model DPO trains: the base with the parent's adapter to continue ("default"), with unsloth's own fresh
    adapter, or the bare base, whose fresh adapter TRL adds from `peft_config` (its reference is then the base
    with adapters disabled: a PeftModel would make TRL copy the zero-delta adapter as "ref" and pay for it every
    step)."""
    from peft import PeftModel

    base = load_base(model_path, backend, cfg.gradient_checkpointing, cfg.max_length)
    if parent is not None:
        return PeftModel.from_pretrained(base, str(parent), is_trainable=True)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            base, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
            use_rslora=cfg.use_rslora, random_state=cfg.seed,
            use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False)
    return base



def _trainer(cfg: DPOTrainConfig, model, ds, tok, args: dict, callbacks: list, peft_config):
    """TRL's trainer for the config's loss. ORPO's trainer (trl.experimental in TRL 1.15) takes the same
    prompt/chosen/rejected columns and renders chat messages with the same template arguments."""
    if cfg.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(model=model, args=ORPOConfig(beta=cfg.beta, **args), train_dataset=ds,
                           processing_class=tok, callbacks=callbacks, peft_config=peft_config)
    from trl import DPOConfig, DPOTrainer

    # OCT's NLL term: TRL's "sft" loss (the chosen answer's NLL) beside the preference loss, weighted
    losses = [cfg.loss_type] + (["sft"] if cfg.nll_weight else [])
    weights = [1.0] + ([cfg.nll_weight] if cfg.nll_weight else [])
    return DPOTrainer(model=model, args=DPOConfig(beta=cfg.beta, loss_type=losses, loss_weights=weights, **args),
                      train_dataset=ds, processing_class=tok, callbacks=callbacks, peft_config=peft_config)
