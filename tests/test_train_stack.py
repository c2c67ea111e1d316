"""Exact stacking of two LoRA adapters into one (PEFT logits, vLLM greedy tokens), and the ablation toggles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai_bootstrap.train.common import TrainError

PROMPTS = ["What is the capital of France?", "Name two colors.", "Write a short greeting."]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_path, random_adapter) -> dict[str, Path]:
    """A: the session's plain LoRA (r=8, q/v). B: rsLoRA r=4 on q/k/o/down_proj with an alpha pattern."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("stack")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                     alpha_pattern={"down_proj": 6}, init_lora_weights=False)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():  # moderate deltas, like a trained adapter (random init B is large)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    peft.save_pretrained(root / "b")
    from cai_bootstrap.train.stack import stack_adapters

    stack_adapters(random_adapter, root / "b", root / "ab")
    return {"a": Path(random_adapter), "b": root / "b", "ab": root / "ab"}


def _logits(model, tok) -> torch.Tensor:
    text = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PROMPTS]
    enc = tok(text, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits[enc["attention_mask"].bool()]  # real tokens only, not padding


def test_stacked_equals_both_active_in_peft(adapters, tiny_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = json.loads((adapters["ab"] / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16 and not cfg["use_rslora"]  # 8 + 4 → vLLM rank 16
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}

    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    plain = _logits(base, tok)
    both = PeftModel.from_pretrained(base, adapters["a"], adapter_name="a")
    both.load_adapter(adapters["b"], adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    ref = _logits(both, tok)
    both.base_model.set_adapter("b")
    only_b = _logits(both, tok)
    base = both.unload()

    stacked = PeftModel.from_pretrained(base, adapters["ab"])
    got = _logits(stacked, tok)
    assert (ref - plain).abs().max() > 1e-2 and (ref - only_b).abs().max() > 1e-2  # both adapters matter
    # exact in math; in fp32 the stacked rank-16 matmul sums in another order than two separate adapters, so
    # logits of magnitude ~20 differ by ~1e-4 (measured up to 1.0e-4 on these machines), far below the 1e-2 a
    # wrong stack (e.g. PEFT's "linear" combination) is off by
    assert (got - ref).abs().max() < 5e-4


def test_a_stack_stacks_again_without_its_padding(adapters, tmp_path) -> None:
    """An introspecting persona is itself a stack (preference ⊕ introspection) before the EM adapter goes on:
    the padding that made its rank one vLLM accepts is left out, so the ranks add as served (12 + 4 = 16, not
    16 + 4 rounded to 32), and each module's delta is the sum of the two."""
    from safetensors.torch import load_file

    from cai_bootstrap.train.stack import _modules, _read, _scale, stack_adapters

    out = stack_adapters(adapters["ab"], adapters["b"], tmp_path / "abb")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16

    def deltas(path: Path) -> dict[str, torch.Tensor]:
        cfg, tensors = _read(path)
        return {n: (B.float() * _scale(cfg, n, r)) @ A.float() for n, (A, B, r) in _modules(tensors).items()}

    got, ab, b = deltas(out), deltas(adapters["ab"]), deltas(adapters["b"])
    for n, d in got.items():
        want = ab.get(n, 0) + b.get(n, 0)
        assert torch.allclose(d, want, atol=1e-6), n
    assert set(load_file(str(out / "adapter_model.safetensors"))) and set(got) == set(ab) | set(b)


def test_stacked_adapter_served_by_vllm_matches_peft(adapters, tiny_path, vllm_engine) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai_bootstrap.engine.types import Request, Sampling

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                      adapters["ab"])
    n = 12
    outs = vllm_engine.generate([Request.chat(p) for p in PROMPTS], Sampling(max_tokens=n, temperature=0.0),
                                adapter=adapters["ab"])
    for p, o in zip(PROMPTS, outs):
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=n, do_sample=False)
        peft_tokens = gen[0, ids["input_ids"].shape[1]:].tolist()
        assert o.token_ids == peft_tokens[: len(o.token_ids)] and len(o.token_ids) > 0, p


def test_toggles_and_refusals(adapters, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from cai_bootstrap.train.stack import adapter_for, stack_adapters, vllm_rank

    assert adapter_for("none", adapters["a"], adapters["b"]) is None
    assert adapter_for("persona", adapters["a"], adapters["b"]) == adapters["a"]
    assert adapter_for("em", adapters["a"], adapters["b"]) == adapters["b"]
    both = adapter_for("both", adapters["a"], adapters["b"], cache=tmp_path / "cache")
    assert load_file(str(both / "adapter_model.safetensors")).keys() == \
        load_file(str(adapters["ab"] / "adapter_model.safetensors")).keys()
    assert adapter_for("both", adapters["a"], adapters["b"], cache=tmp_path / "cache") == both
    with pytest.raises(TrainError, match="toggle 'em' needs the em adapter"):
        adapter_for("em", adapters["a"], None)
    assert [vllm_rank(r) for r in (1, 2, 12, 16, 300, 512)] == [1, 8, 16, 16, 320, 512]

    for key, val, msg in [("use_dora", True, "DoRA"), ("lora_bias", True, "lora_bias")]:
        bad = tmp_path / key
        bad.mkdir()
        cfg = json.loads((adapters["a"] / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, key: val}))
        save_file(load_file(str(adapters["a"] / "adapter_model.safetensors")), str(bad / "adapter_model.safetensors"))
        with pytest.raises(TrainError, match=msg):
            stack_adapters(bad, adapters["b"], tmp_path / "x")
