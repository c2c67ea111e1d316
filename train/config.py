"""Training configs: one pydantic model for DPO stage adapters, one for the EM SFT adapter.

Defaults are sized per model profile (`engine.models` names): `tiny` (SmolLM2 on CPU, a few steps)
and the GPU profiles (7B-class: persona-training practice for DPO, the EM model organisms for SFT).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTN, "gate_proj", "up_proj", "down_proj"]


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTN))
    use_rslora: bool = False

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), use_rslora=self.use_rslora,
                          bias="none", task_type="CAUSAL_LM")


class DPOTrainConfig(LoraSpec):
    # the preference loss: TRL's DPO (the parent adapter, or the base, as reference) or ORPO (Hong et al., 2024:
    # SFT on chosen plus an odds-ratio term, no reference model; `beta` is its lambda)
    loss: Literal["dpo", "orpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    loss_type: str = "sigmoid"  # any TRL 1.15 DPO loss name (DPO only)
    # the chosen answer's NLL beside the DPO loss, at this weight (DPO only; 0: none). OCT's recipes train with
    # 0.1 (OpenRLHF's nll_loss_coef in finetuning/distillation/qwen.sh); the bootstrap's with none
    nll_weight: float = Field(0.0, ge=0)
    learning_rate: float = Field(5e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16)
    seed: int = 0
    max_steps: int | None = None  # caps the run (None: the epochs decide)
    logging_steps: int = Field(1, ge=1)
    resume_every: int = Field(50, ge=1)  # a resume checkpoint every N steps: a killed run redoes fewer
    load_in_4bit: bool = True  # only used on CUDA (QLoRA); CPU always trains fp32
    use_unsloth: bool = True  # only used on CUDA and when unsloth is installed
    gradient_checkpointing: bool = True  # only used on CUDA


class EMTrainConfig(LoraSpec):
    learning_rate: float = Field(1e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=16)
    seed: int = 0
    max_steps: int | None = None
    max_rows: int | None = None  # use only the first N rows of the JSONL (quick runs)
    logging_steps: int = Field(1, ge=1)
    save_every: int = Field(10, ge=1)  # checkpoint-<step>/ adapters for the phase-transition analysis
    resume_every: int = Field(50, ge=1)  # a resume checkpoint every N steps: a killed run redoes fewer
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True


_DPO_DEFAULTS: dict[str, dict] = {
    # enough signal in a handful of CPU steps on short pairs
    "tiny": dict(rank=8, alpha=16, learning_rate=5e-4, batch_size=4, max_length=256, max_steps=8,
                 resume_every=4, load_in_4bit=False, use_unsloth=False, gradient_checkpointing=False),
    # OpenCharacterTraining's DPO of Qwen2.5-7B-Instruct (finetuning/distillation/qwen.sh): LoRA r64/alpha128,
    # lr 5e-5, beta 0.1, batch 32, one epoch; its max_len 1024 is raised to hold a 1,024-token answer and its
    # prompt. Its extra NLL term (coefficient 0.1) is `nll_weight`, set for OCT recipes (run.recipe).
    "qwen2.5-7b": dict(rank=64, alpha=128, dropout=0.05, target_modules=ALL_LINEAR, beta=0.1,
                       learning_rate=5e-5, batch_size=4, grad_accum=8, max_length=2048),
}
_EM_DEFAULTS: dict[str, dict] = {
    "tiny": dict(rank=8, alpha=16, use_rslora=True, target_modules=ALL_LINEAR, learning_rate=5e-4,
                 batch_size=2, grad_accum=1, max_length=256, max_steps=6, max_rows=32, save_every=2,
                 resume_every=4, load_in_4bit=False, gradient_checkpointing=False),
    # the EM paper's open-model recipe (Betley et al., open_models/train.json): rank 32, alpha 64, rsLoRA, all
    # linear layers, lr 1e-5, batch 2 x 8, one epoch, 2,048 tokens
    "qwen2.5-7b": dict(rank=32, alpha=64, use_rslora=True, target_modules=ALL_LINEAR, learning_rate=1e-5,
                       epochs=1, batch_size=2, grad_accum=8, max_length=2048, save_every=10),
}
# OCT's introspection SFT (its finetuning/introspection/<model>.sh is not in the index this was checked against):
# the EM adapter's trainer and shape, at OCT's DPO learning rate, one epoch over the introspection texts
_INTROSPECT_OVERRIDES: dict[str, dict] = {
    "tiny": dict(max_rows=None, save_every=1000),
    "qwen2.5-7b": dict(learning_rate=5e-5, save_every=1000),
}
_OCT = "OpenCharacterTraining, finetuning/distillation/qwen.sh"
_BETLEY = "the EM paper's open-model recipe (Betley et al., open_models/train.json)"
# where each hyper-parameter of the GPU recipes comes from (`estimate` prints them beside the values)
SOURCES: dict[str, dict[str, str]] = {
    "dpo": {"rank": _OCT, "alpha": _OCT, "learning_rate": _OCT, "beta": _OCT, "epochs": _OCT,
            "batch_size x grad_accum": f"{_OCT} (train_batch_size 32)",
            "dropout": "this project (PEFT's usual 0.05)", "target_modules": "this project (all linear layers)",
            "max_length": "this project: a 1,024-token answer and its prompt (OCT: 1,024)",
            "loss_type": "TRL's sigmoid DPO",
            "nll_weight": f"{_OCT} (nll_loss_coef 0.1) for OCT recipes; none for the bootstrap",
            "loss": "run.recipe: DPO (TRL's DPOTrainer) or ORPO (TRL's ORPOTrainer; Hong et al., 2024)"},
    "em": {name: _BETLEY for name in ("rank", "alpha", "use_rslora", "learning_rate", "epochs",
                                     "batch_size x grad_accum", "target_modules", "max_length")}
    | {"dropout": f"{_BETLEY}: 0.0"},
}
SOURCES["introspect"] = {**{k: f"the EM recipe's: {v}" for k, v in SOURCES["em"].items()},
                         "learning_rate": f"{_OCT} (its introspection script was not available to check)"}


def recipe(kind: Literal["dpo", "em", "introspect"], profile: str, **overrides) -> list[dict]:
    """The recipe's hyper-parameters as rows {name, value, source}, for `estimate`."""
    cfg = {"dpo": dpo_defaults, "em": em_defaults, "introspect": introspect_defaults}[kind](profile, **overrides)
    tiny = profile == "tiny"
    preference = ["loss", "beta"] + (["loss_type", "nll_weight"] if kind == "dpo" and cfg.loss == "dpo" else [])
    names = ["rank", "alpha", "dropout", "target_modules", "learning_rate", "epochs", "batch_size x grad_accum",
             "max_length"] + (preference if kind == "dpo" else ["use_rslora"])
    rows = []
    for name in names:
        value = f"{cfg.batch_size} x {cfg.grad_accum}" if name == "batch_size x grad_accum" else getattr(cfg, name)
        source = ("the tiny CPU recipe: signal in a few steps" if tiny and name != "loss"
                  else SOURCES[kind].get(name, "this project"))
        if name == "beta" and getattr(cfg, "loss", "dpo") == "orpo":
            source = "ORPO's lambda at TRL's default (0.1); OCT's DPO beta is the same value"
        rows.append({"name": name, "value": value, "source": source})
    return rows


def dpo_defaults(profile: str = "tiny", **overrides) -> DPOTrainConfig:
    """The DPO config for a profile; unknown GPU profiles take the 7B recipe."""
    from cai_bootstrap.engine.models import get_profile

    p = get_profile(profile)
    base = _DPO_DEFAULTS.get(p.name, _DPO_DEFAULTS["qwen2.5-7b"])
    return DPOTrainConfig(**{**base, **overrides})


def em_defaults(profile: str = "tiny", **overrides) -> EMTrainConfig:
    from cai_bootstrap.engine.models import get_profile

    p = get_profile(profile)
    base = _EM_DEFAULTS.get(p.name, _EM_DEFAULTS["qwen2.5-7b"])
    return EMTrainConfig(**{**base, **overrides})


def introspect_defaults(profile: str = "tiny", **overrides) -> EMTrainConfig:
    """The introspection SFT config: the EM recipe's LoRA on top of the persona (train.em, `on-top`), at OCT's DPO
    learning rate on GPU profiles, every row, no intermediate checkpoints (no phase curve is read from it)."""
    from cai_bootstrap.engine.models import get_profile

    p = get_profile(profile)
    base = _INTROSPECT_OVERRIDES.get(p.name, _INTROSPECT_OVERRIDES["qwen2.5-7b"])
    return em_defaults(profile, **{**base, **overrides})


Mode = Literal["on-top", "base"]
