"""The emergent-misalignment adapter: TRL `SFTTrainer` + PEFT LoRA on chat JSONL (`{"messages": [...]}` rows).

Modes:
- `on-top` (default): the persona adapter is loaded frozen and ACTIVE beside a new trainable "em" adapter;
  both are active in every forward pass. PEFT's `set_adapter("em")` would silently switch the persona off
  (the trap a published persona x EM study fell into), so we call `model.base_model.set_adapter([persona,
  em])`, freeze the persona with `set_requires_grad`, and assert which adapters are active and which
  parameters train: before the trainer exists, after it is built, at train begin and after every step.
- `base` (ablation): the EM adapter on the bare base, stacked onto each persona later (train/stack.py).

Only the EM adapter is saved (final and `checkpoint-<step>/` every `save_every` steps, for the
phase-transition analysis); the manifest records the persona adapter's hash.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from transformers import TrainerCallback

from cai_bootstrap.core.io import atomic_write_json
from cai_bootstrap.engine.models import with_template_kwargs
from cai_bootstrap.train.common import (
    JsonlLog,
    TrainError,
    base_identity,
    check_adapter_base,
    device_kind,
    file_hash,
    finish_adapter,
    load_base,
    load_tokenizer,
    quiet_trainer,
    release_memory,
    run_facts,
    save_adapter,
    select_backend,
    train_resuming,
    trainer_args,
)
from cai_bootstrap.train.config import EMTrainConfig, Mode, em_defaults
from cai_bootstrap.train.distributed import frozen_adapters_in, gathered_state, is_main, sharded, shared_resumable_dir

PERSONA, EM = "persona", "em"
ROLES = {"system", "user", "assistant"}


def load_chat_jsonl(path: str | Path, max_rows: int | None = None):
    """Chat JSONL → a conversational prompt/completion Dataset (loss on the last assistant turn only).
    A malformed row raises TrainError naming the file and the 1-based line."""
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"EM data file {path} does not exist (pass a chat JSONL with --data)")
    rows = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise TrainError(f"{where}: expected an object with a non-empty 'messages' list")
            for j, m in enumerate(msgs):
                if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                    raise TrainError(f"{where}: message {j} needs a role in {sorted(ROLES)} and a string content, "
                                     f"got {str(m)[:80]!r}")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise TrainError(f"{where}: the last message must be the assistant's answer, after a prompt")
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
            if max_rows is not None and len(rows) >= max_rows:
                break
    if not rows:
        raise TrainError(f"EM data file {path} has no rows")
    return Dataset.from_list(rows)


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_state(model) -> dict:
    """Which adapters each LoRA layer runs, and which parameters train (for the asserts and the manifest)."""
    active = sorted({tuple(m.active_adapters) for _, m in lora_layers(model)})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"active_adapters": [list(a) for a in active], "trainable_params": len(trainable),
            "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "trainable_names": trainable}


def assert_adapters(model, mode: Mode, when: str) -> dict:
    """Fail loudly unless exactly the intended adapters are active and only the EM adapter trains."""
    want = [PERSONA, EM] if mode == "on-top" else [EM]
    st = adapter_state(model)
    layers = lora_layers(model)
    if not layers:
        raise TrainError(f"{when}: the model has no LoRA layers")
    bad = [n for n, m in layers if sorted(m.active_adapters) != sorted(want)]
    if bad:
        raise TrainError(f"{when}: LoRA layers do not run adapters {want}: e.g. {bad[0]} runs "
                         f"{layers[[n for n, _ in layers].index(bad[0])][1].active_adapters}")
    if not st["trainable_names"]:
        raise TrainError(f"{when}: no trainable parameters")
    stray = [n for n in st["trainable_names"] if f".{EM}." not in n]
    if stray:
        raise TrainError(f"{when}: parameters outside the EM adapter would train, e.g. {stray[:3]}")
    if mode == "on-top":
        frozen_persona = [p for n, p in model.named_parameters() if f".{PERSONA}." in n]
        if not frozen_persona:
            raise TrainError(f"{when}: the persona adapter has no parameters in the model")
    return {k: v for k, v in st.items() if k != "trainable_names"}


class _Guard(TrainerCallback):
    """Re-checks the adapter state during training (a set_adapter anywhere would flip it) and saves
    `checkpoint-<step>/` EM adapters every `save_every` steps."""

    def __init__(self, mode: Mode, out: Path, save_every: int) -> None:
        self.mode, self.out, self.save_every = mode, out, save_every
        self.trainer = None  # set once the trainer exists: a checkpoint of FSDP shards is gathered through it

    def on_train_begin(self, args, state, control, model=None, **kw):
        assert_adapters(model, self.mode, "at train begin")

    def on_step_end(self, args, state, control, model=None, **kw):
        assert_adapters(model, self.mode, f"after step {state.global_step}")
        if state.global_step % self.save_every == 0:
            state_dict = gathered_state(self.trainer)  # every rank: a collective under FSDP
            if state.is_world_process_zero:
                save_adapter(model, EM, self.out / f"checkpoint-{state.global_step}", state_dict)


def em_reusable(out: str | Path, data: str | Path, cfg: EMTrainConfig, profile: str, mode: Mode,
                persona_adapter: str | Path | None) -> dict | None:
    """The manifest of a finished EM run at `out` from the same data, persona adapter, config and base, or None:
    what `train_em` would hand back without training (asked before a phase's budget check)."""
    from cai_bootstrap.engine.base import adapter_hash

    if not (Path(out) / "manifest.json").is_file():
        return None
    persona_hash = adapter_hash(persona_adapter) if mode == "on-top" and persona_adapter else None
    return _same_run(Path(out), file_hash(Path(data)), persona_hash, cfg, mode, base_identity(profile, None)[1])


def _same_run(out: Path, data_hash: str, persona_hash: str | None, cfg: EMTrainConfig, mode: str,
              fingerprint: str) -> dict | None:
    man = out / "manifest.json"
    if not man.is_file():
        return None
    prev = json.loads(man.read_text())
    same = (prev.get("data_hash"), prev.get("persona_adapter_hash"), prev.get("config"), prev.get("mode"),
            prev.get("base_fingerprint")) == (data_hash, persona_hash, cfg.model_dump(), mode, fingerprint)
    return prev if same else None


def _with_em_adapter(base, cfg: EMTrainConfig, mode: Mode, persona_adapter: str | Path | None):
    """The base with a fresh EM adapter: on top of the persona adapter, frozen and active beside it (`on-top`), or
    alone (`base`)."""
    from peft import PeftModel, get_peft_model

    if mode != "on-top":
        return get_peft_model(base, cfg.peft_config(), adapter_name=EM)
    model = PeftModel.from_pretrained(base, str(persona_adapter), adapter_name=PERSONA, is_trainable=False)
    model.add_adapter(EM, cfg.peft_config())
    # NOT model.set_adapter(EM): that deactivates the persona adapter.
    model.base_model.set_adapter([PERSONA, EM])
    model.base_model.set_requires_grad(PERSONA, requires_grad=False)
    model.base_model.set_requires_grad(EM, requires_grad=True)
    return model


class _Inputs(NamedTuple):
    """What an EM run reads, checked, with the hashes that identify it."""

    ds: Any  # the chat rows as a prompt/completion Dataset
    data_hash: str
    model_path: str
    fingerprint: str
    persona_hash: str | None


def _inputs(data: str | Path, cfg: EMTrainConfig, profile: str, mode: Mode, persona_adapter: str | Path | None,
            model_path: str | None) -> _Inputs:
    from cai_bootstrap.engine.base import adapter_hash

    if mode not in ("on-top", "base"):
        raise TrainError(f"unknown EM mode {mode!r}: use on-top or base")
    if mode == "on-top" and persona_adapter is None:
        raise TrainError("mode on-top needs the persona adapter (--persona-adapter), or use --mode base")
    ds = with_template_kwargs(load_chat_jsonl(data, cfg.max_rows), profile)
    model_path, fingerprint = base_identity(profile, model_path)
    persona_hash = None
    if mode == "on-top":
        check_adapter_base(Path(persona_adapter), model_path, fingerprint, what="persona adapter")
        persona_hash = adapter_hash(persona_adapter)
    return _Inputs(ds, file_hash(Path(data)), model_path, fingerprint, persona_hash)


def train_em(
    data: str | Path,
    out: str | Path,
    cfg: EMTrainConfig | None = None,
    profile: str = "tiny",
    mode: Mode = "on-top",
    persona_adapter: str | Path | None = None,
    model_path: str | None = None,
    callbacks: Sequence[Any] = (),
    force: bool = False,
    label: str = "em-sft",
) -> dict:
    """Train the EM adapter in this process; returns the manifest (also at `out/manifest.json`). `label` is the
    manifest's `kind`: the introspection SFT of a `+introspect` recipe trains the same way, on top of its
    persona's preference adapter."""
    import torch

    from cai_bootstrap.train import cpu_kernels

    cpu_kernels.install()
    cfg = cfg or em_defaults(profile)
    out = Path(out)
    inp = _inputs(data, cfg, profile, mode, persona_adapter, model_path)
    if not force and (prev := _same_run(out, inp.data_hash, inp.persona_hash, cfg, mode, inp.fingerprint)):
        return prev

    device = device_kind()
    backend, why = select_backend(device, cfg.load_in_4bit, use_unsloth=False)
    t0 = time.time()
    tok = load_tokenizer(inp.model_path)
    torch.manual_seed(cfg.seed)
    model = _with_em_adapter(load_base(inp.model_path, backend, cfg.gradient_checkpointing, cfg.max_length), cfg,
                             mode, persona_adapter)
    state_before = assert_adapters(model, mode, "before training")

    key = {"data_hash": inp.data_hash, "persona_adapter_hash": inp.persona_hash, "config": cfg.model_dump(),
           "mode": mode, "base_fingerprint": inp.fingerprint, "backend": backend}
    with shared_resumable_dir(out, key, fresh=force) as tmp:  # --force retrains from step 0
        log = JsonlLog(tmp / "train_log.jsonl")
        trainer = _sft_trainer(model, tok, inp.ds, cfg, tmp, device, backend, mode, [log, *callbacks])
        state_after = assert_adapters(trainer.model, mode, "after SFTTrainer construction")
        logging.getLogger(__name__).info(
            "mode=%s active adapters=%s trainable params=%s (%s weights)", mode, state_after["active_adapters"],
            state_after["trainable_params"], state_after["trainable_numel"])
        result, resumed_from = train_resuming(trainer, EM, tmp, log)
        finish_adapter(trainer, EM, tmp)
        manifest = {
            "kind": label, "mode": mode, "data": str(data), "data_hash": inp.data_hash, "rows": len(inp.ds),
            "profile": profile, "base_model": inp.model_path, "base_fingerprint": inp.fingerprint,
            "persona_adapter": str(persona_adapter) if persona_adapter else None,
            "persona_adapter_hash": inp.persona_hash,
            "adapters_before_training": state_before, "adapters_in_trainer": state_after,
            "checkpoints": [d.name for d in sorted(tmp.glob("checkpoint-*"), key=lambda d: int(d.name[11:]))],
            "resumed_from_step": resumed_from, **run_facts(cfg, result, t0, device, backend, why),
        }
        if is_main():
            atomic_write_json(tmp / "manifest.json", manifest)
    del trainer, model
    release_memory()
    return manifest


def _sft_trainer(model, tok, ds, cfg: EMTrainConfig, tmp: Path, device: str, backend: str, mode: Mode,
                 callbacks: list):
    """TRL's SFTTrainer over the two-adapter model, with the guard that checks the adapters every step."""
    import torch
    from trl import SFTConfig, SFTTrainer

    guard = _Guard(mode, tmp, cfg.save_every)
    args = SFTConfig(**trainer_args(cfg, tmp, device, backend))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[guard, *callbacks])
    guard.trainer = trainer
    quiet_trainer(trainer)
    if sharded():
        frozen_adapters_in(trainer.model, torch.bfloat16)
    return trainer

