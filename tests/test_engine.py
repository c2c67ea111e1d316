"""Both engines on the real tiny model: answers, parity, adapters, base-model mode, bad input."""

from __future__ import annotations

import pytest

from cai_bootstrap.engine.models import ModelError, get_profile
from cai_bootstrap.engine.types import EngineError, Request, Sampling

CHATS = [Request.chat("What is the capital of France?"), Request.chat("Name three primary colours.")]
GREEDY = Sampling(max_tokens=16, temperature=0.0)


@pytest.mark.parametrize("kind", ["vllm_engine", "hf_engine"])
def test_engine_answers_a_batch(kind, request):
    eng = request.getfixturevalue(kind)
    calls = eng.calls
    out = eng.generate(CHATS, GREEDY)
    assert [c.request_index for c in out] == [0, 1]
    assert "Paris" in out[0].text
    assert all(c.completion_tokens > 0 and c.prompt_tokens > 10 for c in out)
    assert all(c.finish_reason in {"stop", "length"} for c in out)
    assert eng.calls == calls + 1  # one batched call for the whole list
    u = eng.usage[-1]
    assert u.requests == 2 and u.tokens_out == sum(c.completion_tokens for c in out) and u.seconds > 0


def test_greedy_parity_between_engines(vllm_engine, hf_engine):
    a = vllm_engine.generate(CHATS, GREEDY)
    b = hf_engine.generate(CHATS, GREEDY)
    for x, y in zip(a, b):
        assert x.token_ids[:4] == y.token_ids[:4]


def test_n_samples_are_request_major(vllm_engine, hf_engine):
    s = Sampling(max_tokens=8, temperature=1.0, n=3, seed=1)
    for eng in (vllm_engine, hf_engine):
        out = eng.generate(CHATS, s)
        assert [(c.request_index, c.sample_index) for c in out] == [(i, j) for i in range(2) for j in range(3)]
    # the labels sit on the right texts: with vLLM's per-request seeds, request i's samples in the batch are
    # the ones it gets alone (a batch whose outputs were shuffled or misattributed would differ)
    out = vllm_engine.generate(CHATS, s)
    for i, chat in enumerate(CHATS):
        alone = vllm_engine.generate([chat], s)
        assert [c.text for c in out if c.request_index == i] == [c.text for c in alone]
    assert {c.text for c in out if c.request_index == 0} != {c.text for c in out if c.request_index == 1}


@pytest.mark.parametrize("kind", ["vllm_engine", "hf_engine"])
def test_adapter_changes_logprobs_only_when_passed(kind, request, random_adapter):
    eng = request.getfixturevalue(kind)
    s = Sampling(max_tokens=4, temperature=0.0, logprobs=5)
    base1 = eng.generate(CHATS[:1], s)[0]
    tuned = eng.generate(CHATS[:1], s, adapter=random_adapter)[0]
    base2 = eng.generate(CHATS[:1], s)[0]
    tok = base1.logprobs[0]
    assert base2.token_ids == base1.token_ids
    first = next(iter(tok))
    assert base2.logprobs[0][first] == pytest.approx(tok[first], abs=1e-3)
    shared = set(tuned.logprobs[0]) & set(tok)
    assert tuned.token_ids != base1.token_ids or any(abs(tuned.logprobs[0][t] - tok[t]) > 1e-2 for t in shared)


def test_base_model_mode_raw_prompt(vllm_engine, hf_engine):
    prompt = "Question: Which city is the capital of France?\nAnswer: The capital of France is"
    n_raw = len(vllm_engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for eng in (vllm_engine, hf_engine):
        out = eng.generate([Request(prompt=prompt)], Sampling(max_tokens=12, stop=["\n"]))[0]
        assert out.prompt_tokens == n_raw  # no chat template was applied
        assert "Paris" in out.text and "\n" not in out.text


def test_empty_request_list_gives_empty_result(vllm_engine):
    calls = vllm_engine.calls
    assert vllm_engine.generate([], GREEDY) == []
    assert vllm_engine.calls == calls


def test_unknown_profile_is_named():
    with pytest.raises(ModelError, match="no-such-model.*known profiles"):
        get_profile("no-such-model")


@pytest.mark.parametrize("kind", ["vllm_engine", "hf_engine"])
def test_missing_adapter_directory_is_named(kind, request, tmp_path):
    eng = request.getfixturevalue(kind)
    with pytest.raises(EngineError, match="nope.*adapter_config.json"):
        eng.generate(CHATS, GREEDY, adapter=tmp_path / "nope")


def test_request_over_context_length_is_named(vllm_engine):
    long = Request.chat("word " * 3000)
    with pytest.raises(EngineError, match="request 1 .*context length 2048"):
        vllm_engine.generate([CHATS[0], long], GREEDY)


def test_request_needs_messages_or_prompt():
    with pytest.raises(ValueError, match="exactly one"):
        Request()


def test_prefix_prefills_the_assistant_turn(vllm_engine, hf_engine):
    req = Request(messages=[{"role": "user", "content": "Rate this from 1 to 10."}], prefix="Score: ")
    text = vllm_engine.render(req)
    assert text.endswith("<|im_start|>assistant\nScore: ")
    out = hf_engine.generate([req], Sampling(max_tokens=2, logprobs=20))[0]
    assert any(t.strip().isdigit() for t in out.logprobs[0])  # a number is among the likely next tokens


# Qwen3's switch, reduced to what matters here: with `enable_thinking=False` the assistant turn opens with an
# empty think block, in the generation prompt and in a rendered answer alike
THINKING_TEMPLATE = (
    "{% set off = enable_thinking is defined and enable_thinking is false %}"
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role == 'assistant' and off %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if off %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)


def test_thinking_is_off_where_generation_and_dpo_render_a_chat(tiny_path, tmp_path):
    """A Qwen3 profile renders with `enable_thinking=False` in the engine, and TRL's DPO tokenises the pairs
    with the same argument (through `with_template_kwargs`' per-row column): the trained prompt is the one the
    engine generated from."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from cai_bootstrap.engine.base import Engine
    from cai_bootstrap.engine.models import with_template_kwargs

    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.chat_template = THINKING_TEMPLATE
    qwen3 = get_profile("qwen3-4b")
    assert qwen3.chat_template_kwargs == {"enable_thinking": False} and not get_profile("tiny").chat_template_kwargs
    engine = SimpleNamespace(profile=qwen3, tokenizer=tok)
    prompt = Engine.render(engine, Request.chat("Name a colour."))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": "Name a colour."}],
                                "chosen": [{"role": "assistant", "content": "Blue."}],
                                "rejected": [{"role": "assistant", "content": "No."}]}])
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, use_cpu=True, bf16=False)
    for profile, thinks in (("qwen3-4b", False), ("tiny", True)):
        trainer = DPOTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=with_template_kwargs(pairs, profile))
        row = trainer.train_dataset[0]
        trained_prompt = tok.decode(row["prompt_ids"])
        # SmolLM2's tokenizer merges the block's last newlines with the answer, so TRL ends the prompt before
        # them (it warns); Qwen's does not
        assert prompt.startswith(trained_prompt)
        assert ("<think>\n\n</think>" in trained_prompt) is not thinks
