"""Shared fixtures: one engine of each kind per test session (vLLM takes ~40 s to start on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
EM_DATA = SHARED / "data" / "em"


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from cai_bootstrap.engine.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def lora_mark(tmp_path_factory) -> Path:
    """Where each vLLM process started from here on records that it installed, and ran, the grouped LoRA ops
    (engine.vllm_cpu_lora)."""
    import os

    from cai_bootstrap.engine.vllm_cpu_lora import MARK_ENV

    path = tmp_path_factory.mktemp("lora-mark")
    os.environ[MARK_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def vllm_engine(lora_mark):
    from cai_bootstrap.engine.vllm_engine import VLLMEngine

    with VLLMEngine("tiny") as eng:
        yield eng


@pytest.fixture(scope="session")
def hf_engine():
    from cai_bootstrap.engine.hf_engine import HFEngine

    with HFEngine("tiny") as eng:
        yield eng


@pytest.fixture(scope="session")
def random_adapter(tmp_path_factory, tiny_path) -> str:
    """A PEFT LoRA adapter on the tiny model with random (non-zero) B, so it changes the logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapters") / "random"
    peft.save_pretrained(out)
    return str(out)
