"""What DPO and EM training share: errors, adapter saving, base-model loading per backend,
the JSONL training log, adapter/base compatibility checks and manifests. Output dirs are written with
`core.io.atomic_dir`, manifests with `core.io.atomic_write_json`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.core.io import atomic_write_jsonl, swap_dir
from cai_bootstrap.train.distributed import claim_device, gathered_state, is_main, sharded, world_size


class TrainError(BadInput, RuntimeError):
    """Bad training input (dataset, adapter, base), named clearly."""


# ---------------------------------------------------------------- adapter files
def save_adapter(model, name: str, out: Path, state_dict: dict | None = None) -> None:
    """Save one named adapter of a PeftModel as a plain adapter dir (PEFT nests non-default names). `state_dict`:
    the whole model's, gathered from its FSDP shards (train.distributed.gathered_state)."""
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name], **({"state_dict": state_dict} if state_dict else {}))
        src = Path(tmp) if name == "default" else Path(tmp) / name
        swap_dir(src, Path(out))  # a step redone after a resume saves over its earlier copy


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def tensors_hash(tensors: dict[str, Any]) -> str:
    """Hash of named tensors (names normalised to drop the adapter name), for 'starts from' checks."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def adapter_tensors(model, name: str) -> dict[str, Any]:
    """The LoRA tensors of adapter `name` in a live PeftModel, keyed like the saved safetensors."""
    out = {}
    for k, v in model.named_parameters():
        if f".{name}." in k and "lora_" in k:
            out[k.replace(f".{name}.", ".")] = v
    return out


def saved_adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


# ---------------------------------------------------------------- device and base model
def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def select_backend(device: str, load_in_4bit: bool, use_unsloth: bool) -> tuple[str, str]:
    """(backend, why). unsloth is imported only on CUDA (it raises at import without a GPU)."""
    import importlib.util

    if device != "cuda":
        return "trl+peft-fp32", "no CUDA: fp32 TRL + PEFT"
    if use_unsloth and sharded():
        why = "FSDP over several processes: unsloth trains on one GPU"
    elif use_unsloth and importlib.util.find_spec("unsloth") is not None:
        try:
            import unsloth  # noqa: F401

            return "unsloth", "CUDA and unsloth importable"
        except Exception as e:  # a broken unsloth install must not stop training
            why = f"unsloth failed to import ({type(e).__name__}: {e}); fell back"
    else:
        why = "unsloth not installed" if use_unsloth else "unsloth disabled in config"
    if load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            return "trl+peft-bf16", why + "; bitsandbytes missing: bf16 LoRA instead of 4-bit QLoRA"
        return "trl+peft-qlora", why + "; 4-bit QLoRA via bitsandbytes"
    return "trl+peft-bf16", why + "; 4-bit disabled"


def load_base(model_path: str, backend: str, gradient_checkpointing: bool = False, max_length: int = 2048):
    """The base model for `backend`: fp32 on CPU, bf16 or 4-bit NF4 (bitsandbytes) on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM

    if backend == "trl+peft-fp32":
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, _tok = FastLanguageModel.from_pretrained(model_name=model_path, max_seq_length=max_length,
                                                        load_in_4bit=True, dtype=None)
        return model
    claim_device()  # a rank of a launch loads onto its own GPU
    placement = {"device_map": {"": torch.cuda.current_device()}}
    if backend == "trl+peft-qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        # under FSDP the 4-bit weights are stored in bf16 words, so they shard like the rest (bitsandbytes' FSDP-QLoRA)
        storage = {"bnb_4bit_quant_storage": torch.bfloat16} if sharded() else {}
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, **storage)
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=q, dtype=torch.bfloat16,
                                                     **placement)
        if sharded():  # kbit preparation upcasts some weights to fp32, which FSDP cannot shard with bf16 ones
            return model
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, **placement)


def base_identity(profile: str, model_path: str | None) -> tuple[str, str]:
    """(model path, fingerprint) for a profile, or for an explicit model dir (bench, random configs)."""
    from cai_bootstrap.engine.models import hash_weights, model_fingerprint, resolve_model

    if model_path is None:
        return resolve_model(profile), model_fingerprint(profile)
    p = Path(model_path)
    fp = p / "fingerprint.txt"
    return str(p), fp.read_text().strip() if fp.is_file() else hash_weights(p)


def check_adapter_base(adapter: Path, model_path: str, fingerprint: str, what: str = "adapter") -> None:
    """Refuse an adapter trained on another base: by the fingerprint in its manifest when it has one,
    else by the base path in its adapter_config."""
    adapter = Path(adapter)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise TrainError(f"{what} {adapter} has no adapter_config.json (missing or not a PEFT adapter)")
    man = adapter / "manifest.json"
    if man.is_file():
        theirs = json.loads(man.read_text()).get("base_fingerprint")
        if theirs and theirs != fingerprint:
            raise TrainError(f"{what} {adapter} was trained on base fingerprint {theirs}, but this base "
                             f"({model_path}) has fingerprint {fingerprint}: an adapter of another base model")
        if theirs:
            return
    cfg = json.loads(cfg_file.read_text())
    theirs = cfg.get("base_model_name_or_path")
    if theirs and not _same_base(theirs, model_path):
        raise TrainError(f"{what} {adapter} was trained on base {theirs!r}, not on {model_path!r}: "
                         "an adapter of another base model")


def _same_base(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


# ---------------------------------------------------------------- logging
class JsonlLog(TrainerCallback):
    """Append every Trainer log record (loss, rewards/margins, rewards/accuracies, ...) as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or not state.is_world_process_zero:  # one log per run, however many processes train it
            return
        rec = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        self.records.append(rec)
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def keep_until(self, step: int) -> None:
        """Resuming from `step`: drop the records of steps after it (they run again), and a torn last line."""
        if not self.path.is_file() or not is_main():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                if (rec := json.loads(line))["step"] <= step:
                    kept.append(rec)
        atomic_write_jsonl(self.path, kept)
        self.records = kept


def quiet_trainer(trainer) -> None:
    """Drop the Trainer's console printers (a tqdm bar, and every log record printed as a raw dict to stdout):
    JsonlLog keeps the same records in the adapter's train_log.jsonl, and the phase's console line says when
    training starts and ends."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def load_tokenizer(model_path: str):
    """The base's tokenizer; one without a pad token (SmolLM2, Qwen base) pads with EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def trainer_args(cfg, run_dir: Path, device: str, backend: str) -> dict:
    """The TrainingArguments fields DPO and EM SFT share. The trainer's scratch is run_dir/trainer, where it
    keeps one resume checkpoint (adapters, optimizer, scheduler, RNG, its state) every `cfg.resume_every`
    steps; the trained adapter itself is saved by name (`finish_adapter`)."""
    return dict(
        output_dir=str(run_dir / "trainer"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        max_length=cfg.max_length,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.resume_every,
        save_total_limit=1,  # the older one goes only once the newer is complete
        report_to=[],
        dataloader_num_workers=0,
        **trainer_device_args(device, backend, cfg.gradient_checkpointing),
    )


# ---------------------------------------------------------------- resuming a killed run
def resume_point(run_dir: Path) -> Path | None:
    """The newest complete resume checkpoint in run_dir/trainer, or None. The Trainer writes a checkpoint's
    trainer_state.json last, so one whose state parses is whole."""
    found = []
    for d in (Path(run_dir) / "trainer").glob("checkpoint-*"):
        with contextlib.suppress(ValueError, OSError):
            found.append((json.loads((d / "trainer_state.json").read_text())["global_step"], d))
    return max(found)[1] if found else None


def train_resuming(trainer, name: str, run_dir: Path, log: JsonlLog):
    """trainer.train(), from run_dir's last resume checkpoint when a killed run left one: the adapter `name`,
    optimizer, scheduler, RNG and data position come back, the log keeps the steps that checkpoint holds, and
    only the steps after it run again. Returns (TrainOutput, the step resumed from or 0)."""
    ckpt = resume_point(run_dir)
    if ckpt is None:
        return trainer.train(), 0
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    log.keep_until(step)
    # The Trainer's own adapter loading reloads only the first active adapter and, when several adapters are
    # saved (DPO's frozen "ref", EM's persona), skips the root one and re-activates the wrong one. We load
    # the trained adapter ourselves; the Trainer restores the rest.
    trainer._load_from_checkpoint = lambda path, model=None: load_adapter_weights(trainer.model, name, Path(path))
    return trainer.train(resume_from_checkpoint=str(ckpt)), step


def load_adapter_weights(model, name: str, ckpt: Path) -> None:
    """Put adapter `name`'s weights from a Trainer checkpoint (PEFT saves "default" at its root, other names
    in a sub-directory) into the live model, failing if any of its LoRA weights is not there."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    src = ckpt if name == "default" else ckpt / name
    res = set_peft_model_state_dict(model, load_file(str(src / "adapter_model.safetensors")), adapter_name=name)
    missing = [k for k in res.missing_keys if f".{name}." in k and "lora_" in k]
    if missing:
        raise TrainError(f"resume checkpoint {ckpt} lacks weights of adapter {name!r}, e.g. {missing[0]}")


def finish_adapter(trainer: Any, name: str, run_dir: Path) -> None:
    """Save the trained adapter `name` as run_dir's own files (the run dir is the adapter dir) and drop the
    trainer's scratch. Every rank of a launch calls it; the main rank writes."""
    state_dict = gathered_state(trainer)
    if not is_main():
        return
    save_adapter(trainer.model, name, run_dir / "adapter", state_dict)
    for f in (run_dir / "adapter").iterdir():
        os.replace(f, run_dir / f.name)
    (run_dir / "adapter").rmdir()
    shutil.rmtree(run_dir / "trainer", ignore_errors=True)


def run_facts(cfg, result, t0: float, device: str, backend: str, why: str) -> dict:
    """The manifest fields every training run records: config, steps, loss, time and where it ran."""
    import torch

    return {
        "config": cfg.model_dump(),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "wall_s": round(time.time() - t0, 2),
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "backend": backend,
        "backend_why": why,
        "processes": world_size(),
    }


def trainer_device_args(device: str, backend: str, gradient_checkpointing: bool) -> dict:
    """TrainingArguments fields that depend on where training runs."""
    if device == "cpu":
        return dict(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False)
    if sharded():  # FSDP: non-re-entrant activation checkpoints and a plain optimizer over the shards
        return dict(bf16=True, gradient_checkpointing=gradient_checkpointing, optim="adamw_torch",
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    return dict(bf16=True, gradient_checkpointing=gradient_checkpointing,
                optim="paged_adamw_8bit" if backend in ("trl+peft-qlora", "unsloth") else "adamw_torch")


def release_memory() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
