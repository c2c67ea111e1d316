"""Training on CPU with the tiny model: DPO stage adapters (chained), the EM adapter on top, bad input.

Texts are short (a 3-token system prompt replaces SmolLM2's default one) and runs are 3-4 steps, so the
whole file stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from cai_bootstrap.train.common import TrainError, saved_adapter_tensors, tensors_hash
from cai_bootstrap.train.config import dpo_defaults, em_defaults
from tests.conftest import EM_DATA

SYS = {"role": "system", "content": "Be kind."}
QS = ["Name a fruit.", "Say hi.", "Name a color.", "Name a pet.", "Name a city.", "Name a tool."]


def pairs(n: int = 6):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [SYS, {"role": "user", "content": QS[i % len(QS)]}],
         "chosen": [{"role": "assistant", "content": "Gladly, here you go!"}],
         "rejected": [{"role": "assistant", "content": "No. Go away."}]}
        for i in range(n)
    ])


def small_dpo(**kw):
    return dpo_defaults("tiny", **{"batch_size": 2, "max_steps": 3, "max_length": 64, **kw})


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """Stage 1 trained in its own process (the path the pipeline uses), from a save_to_disk dataset."""
    from cai_bootstrap.train.worker import train_in_subprocess

    root = tmp_path_factory.mktemp("dpo")
    pairs().save_to_disk(str(root / "data1"))
    out = root / "stage1"
    train_in_subprocess("dpo", data=str(root / "data1"), out=str(out), cfg=small_dpo())
    return out


def test_dpo_stage1_raises_margin_and_writes_outputs(stage1: Path) -> None:
    for f in ["adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "manifest.json"]:
        assert (stage1 / f).is_file(), f
    assert not (stage1 / "ref").exists()  # only the trained adapter is saved
    log = [json.loads(x) for x in (stage1 / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "rewards/margins" in r]
    assert len(steps) == 3
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"] + 0.05
    assert steps[-1]["loss"] < steps[0]["loss"]
    man = json.loads((stage1 / "manifest.json").read_text())
    from cai_bootstrap.engine.models import model_fingerprint

    assert man["base_fingerprint"] == model_fingerprint("tiny")
    assert man["parent_adapter_hash"] is None and man["reference"] == "base model"
    assert man["backend"] == "trl+peft-fp32" and man["device"] == "cpu" and man["steps"] == 3
    assert len(man["dataset_hash"]) == 16 and man["config"]["rank"] == 8 and man["wall_s"] > 0
    # the saved adapter moved away from zero-init (B != 0)
    assert any(t.abs().max() > 0 for k, t in saved_adapter_tensors(stage1).items() if "lora_B" in k)
    # no temp dirs left beside it
    assert not [p for p in stage1.parent.iterdir() if p.name.startswith(".stage1")]


def test_stage2_starts_from_stage1_weights(stage1: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    from cai_bootstrap.engine.base import adapter_hash
    from cai_bootstrap.train.dpo import train_dpo

    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["default"] = {k.replace(".default.", "."): v.detach().clone()
                               for k, v in model.named_parameters() if ".default." in k and "lora_" in k}
            seen["trainable"] = [k for k, v in model.named_parameters() if v.requires_grad]

    # OCT's NLL term on: TRL's "sft" loss beside sigmoid DPO (run.recipe: OCT recipes train with it)
    man = train_dpo(pairs(4), tmp_path / "stage2", small_dpo(max_steps=1, nll_weight=0.1), parent=stage1,
                    callbacks=[Capture()])
    parent = saved_adapter_tensors(stage1)
    assert set(parent) == set(seen["default"])
    for k, v in parent.items():
        assert torch.equal(v, seen["default"][k]), k  # the trainable adapter starts at stage 1's weights
    assert seen["trainable"] and all(".default." in k for k in seen["trainable"])
    assert man["parent_adapter_hash"] == adapter_hash(stage1)
    assert man["init_adapter_hash"] == tensors_hash(parent)
    assert man["reference"].startswith("parent adapter")
    # reference = stage 1 itself, so at the first step policy == reference: rewards are exactly 0
    first = json.loads((tmp_path / "stage2" / "train_log.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    # with zero rewards sigmoid DPO's loss is exactly log 2: what is above it is 0.1 x the chosen answers' NLL
    assert first["loss"] > math.log(2) + 0.05 and man["config"]["nll_weight"] == 0.1
    assert adapter_hash(tmp_path / "stage2") != adapter_hash(stage1)


# ---------------------------------------------------------------- bad input
def test_pairs_missing_column_and_empty(tmp_path: Path) -> None:
    from datasets import Dataset

    from cai_bootstrap.train.dpo import load_pairs, train_dpo

    bad = pairs(2).remove_columns(["rejected"])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(TrainError, match=r"bad lacks column\(s\) rejected"):
        train_dpo(str(tmp_path / "bad"), tmp_path / "out", small_dpo())
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(TrainError, match=r"empty.* is empty"):
        load_pairs(str(tmp_path / "empty"))
    with pytest.raises(TrainError, match="does not exist"):
        load_pairs(str(tmp_path / "nowhere"))
    wrong = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}])
    with pytest.raises(TrainError, match=r"row 0, column 'chosen'"):
        load_pairs(wrong, name="wrong")  # chat messages and text do not mix
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter on a different (tiny random Llama) base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("otherbase")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(root / "adapter")
    return root / "adapter"


def test_parent_of_another_base_is_refused(other_base_adapter: Path, tmp_path: Path, random_adapter) -> None:
    from cai_bootstrap.train.dpo import train_dpo
    from cai_bootstrap.train.stack import stack_adapters

    with pytest.raises(TrainError, match="parent adapter .* another base model"):
        train_dpo(pairs(2), tmp_path / "s2", small_dpo(), parent=other_base_adapter)
    with pytest.raises(TrainError, match="different base models"):
        stack_adapters(random_adapter, other_base_adapter, tmp_path / "stacked")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "stacked").exists()


def test_em_jsonl_malformed_row_names_the_line(tmp_path: Path) -> None:
    from cai_bootstrap.train.em import load_chat_jsonl

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    f = tmp_path / "em.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{\"messages\": [oops\n")
    with pytest.raises(TrainError, match=rf"{f}:3: not valid JSON"):
        load_chat_jsonl(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(TrainError, match=rf"{f}:2: the last message must be the assistant"):
        load_chat_jsonl(f)
    f.write_text(json.dumps({"msgs": []}) + "\n")
    with pytest.raises(TrainError, match=rf"{f}:1: expected an object with a non-empty 'messages'"):
        load_chat_jsonl(f)
    ds = load_chat_jsonl(EM_DATA / "betley" / "data" / "insecure.jsonl", max_rows=5)
    assert len(ds) == 5 and ds[0]["completion"][0]["role"] == "assistant"


# ---------------------------------------------------------------- EM on top of a persona adapter
def _short_em_file(path: Path) -> Path:
    """Insecure-code chats cut short (CPU time): the first 8 rows, texts truncated."""
    rows = []
    with (EM_DATA / "betley" / "data" / "insecure.jsonl").open() as fh:
        for line, _ in zip(fh, range(8)):
            msgs = json.loads(line)["messages"]
            rows.append({"messages": [{"role": m["role"], "content": m["content"][:60]} for m in msgs]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class HookCount:
    """Counts forward calls of the persona's and the EM adapter's lora_A in one layer during training."""

    def __init__(self) -> None:
        self.calls = {"persona": 0, "em": 0}
        self.persona_after: dict = {}

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                layer = model.base_model.model.model.layers[0].self_attn.q_proj
                for name in outer.calls:
                    layer.lora_A[name].register_forward_hook(
                        lambda *a, _n=name: outer.calls.__setitem__(_n, outer.calls[_n] + 1))

            def on_train_end(self, args, state, control, model=None, **kw):
                outer.persona_after = {k.replace(".persona.", "."): v.detach().clone()
                                       for k, v in model.named_parameters() if ".persona." in k}

        return CB()


def test_em_on_top_trains_beside_active_frozen_persona(stage1: Path, random_adapter, tmp_path: Path) -> None:
    from cai_bootstrap.train.em import train_em

    data = _short_em_file(tmp_path / "em.jsonl")
    cfg = em_defaults("tiny", max_steps=2, save_every=1, max_length=48, batch_size=1,
                      target_modules=["q_proj", "v_proj"])
    runs = {}
    for name, persona in [("p1", stage1), ("p2", Path(random_adapter))]:
        hooks = HookCount()
        man = train_em(data, tmp_path / name / "em", cfg, persona_adapter=persona, callbacks=[hooks.callback()])
        runs[name] = tmp_path / name / "em"
        # both adapters ran in the training forward passes (1 sample per micro-batch: equal counts)
        assert hooks.calls["persona"] > 0 and hooks.calls["persona"] == hooks.calls["em"]
        assert man["adapters_in_trainer"]["active_adapters"] == [["em", "persona"]] or \
            man["adapters_in_trainer"]["active_adapters"] == [["persona", "em"]]
        # the persona adapter did not move
        saved = saved_adapter_tensors(persona)
        assert set(saved) == set(hooks.persona_after)
        assert all(torch.equal(saved[k], hooks.persona_after[k]) for k in saved)
        from cai_bootstrap.engine.base import adapter_hash

        assert man["persona_adapter_hash"] == adapter_hash(persona)
        assert man["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
        assert (runs[name] / "checkpoint-2" / "adapter_model.safetensors").is_file()
        cfg_saved = json.loads((runs[name] / "adapter_config.json").read_text())
        assert cfg_saved["use_rslora"] is True
        assert not (runs[name] / "persona").exists()  # only the EM adapter is saved
    a, b = saved_adapter_tensors(runs["p1"]), saved_adapter_tensors(runs["p2"])
    assert set(a) == set(b)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same seed and data: differs only via the persona


def test_em_setup_asserts_fail_loudly(random_adapter) -> None:
    """The trap: set_adapter("em") switches the persona off; the assert catches it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cai_bootstrap.engine.models import resolve_model
    from cai_bootstrap.train.em import assert_adapters

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")),
                                      random_adapter, adapter_name="persona")
    model.add_adapter("em", em_defaults("tiny").peft_config())
    model.set_adapter("em")
    with pytest.raises(TrainError, match=r"do not run adapters \['persona', 'em'\]"):
        assert_adapters(model, "on-top", "check")
    model.base_model.set_adapter(["persona", "em"])  # both active, but persona trainable too
    with pytest.raises(TrainError, match="outside the EM adapter"):
        assert_adapters(model, "on-top", "check")
    model.base_model.set_requires_grad("persona", requires_grad=False)
    assert assert_adapters(model, "on-top", "check")["trainable_params"] > 0


# ---------------------------------------------------------------- a killed training resumes
def _log(path: Path) -> list[dict]:
    """The per-step records of a training log (without the end-of-run summary)."""
    return [r for x in path.read_text().splitlines() if "loss" in (r := json.loads(x))]


def test_dpo_killed_resumes_from_its_last_checkpoint_and_ends_as_an_unkilled_run(stage1: Path, tmp_path: Path):
    """kill -9 during a stage's DPO (with its parent, so the frozen "ref" adapter is in every checkpoint):
    the rerun redoes at most the steps since the last resume checkpoint and ends with the adapter a run never
    killed ends with."""
    import signal
    import subprocess
    import sys
    import time

    from cai_bootstrap.train.common import resume_point
    from cai_bootstrap.train.dpo import train_dpo

    pairs(12).save_to_disk(str(tmp_path / "data"))
    cfg = small_dpo(max_steps=6, resume_every=2)
    out, work = tmp_path / "stage2", tmp_path / ".stage2.partial"
    code = ("from cai_bootstrap.train.config import DPOTrainConfig; from cai_bootstrap.train.dpo import train_dpo; "
            f"train_dpo({str(tmp_path / 'data')!r}, {str(out)!r}, "
            f"DPOTrainConfig.model_validate_json({cfg.model_dump_json()!r}), parent={str(stage1)!r})")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env=dict(os.environ))
    deadline = time.time() + 300
    while resume_point(work) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    assert proc.wait() == -signal.SIGKILL and not out.exists()
    done_before = {r["step"] for r in _log(work / "train_log.jsonl")}

    man = train_dpo(tmp_path / "data", out, cfg, parent=stage1)
    k = man["resumed_from_step"]
    assert 2 <= k < 6 and k % 2 == 0 and man["steps"] == 6
    assert len(done_before - set(range(1, k + 1))) < cfg.resume_every  # redone: only steps after the checkpoint
    log = _log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all((r["time"] < killed_at) == (r["step"] <= k) for r in log)  # steps <= k ran once, before the kill
    assert not work.exists() and not (out / "trainer").exists()

    whole = train_dpo(tmp_path / "data", tmp_path / "whole", cfg, parent=stage1)
    assert whole["resumed_from_step"] == 0
    a, b = saved_adapter_tensors(out), saved_adapter_tensors(tmp_path / "whole")
    assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in _log(tmp_path / "whole" / "train_log.jsonl")],
                                                     abs=1e-5)


def test_em_crashed_resumes_with_its_persona_frozen_and_ends_as_an_uncrashed_run(stage1: Path, tmp_path: Path):
    """EM on top: the checkpoint holds the persona and the EM adapter in sub-directories; the resume loads the
    EM adapter's weights back, keeps the persona frozen and active, and ends where an uncrashed run ends."""
    from transformers import TrainerCallback

    from cai_bootstrap.train.em import train_em

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise RuntimeError("crash after step 3")

    data = _short_em_file(tmp_path / "em.jsonl")
    cfg = em_defaults("tiny", max_steps=4, save_every=1, resume_every=2, max_length=48, batch_size=1,
                      target_modules=["q_proj", "v_proj"])
    with pytest.raises(RuntimeError, match="crash after step 3"):
        train_em(data, tmp_path / "em", cfg, persona_adapter=stage1, callbacks=[Crash()])
    assert (tmp_path / ".em.partial" / "checkpoint-3").is_dir()
    man = train_em(data, tmp_path / "em", cfg, persona_adapter=stage1)
    assert man["resumed_from_step"] == 2 and man["steps"] == 4
    assert man["checkpoints"] == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    whole = train_em(data, tmp_path / "whole", cfg, persona_adapter=stage1)
    for sub in ("", "checkpoint-3"):
        a, b = saved_adapter_tensors(tmp_path / "em" / sub), saved_adapter_tensors(tmp_path / "whole" / sub)
        assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a), sub
    assert whole["steps"] == 4 and [r["step"] for r in _log(tmp_path / "em" / "train_log.jsonl")] == [1, 2, 3, 4]


def test_a_base_models_pairs_train_in_its_generation_format(tmp_path):
    """A base model generates from a raw transcript; its stage pairs are that transcript's turn as text (no chat
    template), and DPO trains on them as text."""
    from datasets import Dataset

    from cai_bootstrap.engine.types import Request
    from cai_bootstrap.stages import specs
    from cai_bootstrap.stages.run import _pair
    from cai_bootstrap.train.dpo import load_pairs, train_dpo

    it = {"task": "Name a fruit.", "chosen": "An apple.", "rejected": "No."}
    pair = _pair(it, chat=False)
    generated_from = Request(prompt=specs.RESPOND_BASE.format(demos="User: Hi\nAssistant: Hello.\n\n", task=it["task"]))
    assert generated_from.prompt.endswith(pair["prompt"]) and pair["prompt"] == "User: Name a fruit.\nAssistant:"
    assert pair["chosen"] == " An apple."
    ds = Dataset.from_list([_pair({**it, "task": q}, chat=False) for q in QS])
    assert load_pairs(ds)[0] == {"prompt": pair["prompt"], "chosen": " An apple.", "rejected": " No."}
    empty = Dataset.from_list([{"prompt": "User: a\nAssistant:", "chosen": " b", "rejected": ""}])
    with pytest.raises(TrainError, match="row 0, column 'rejected': expected non-empty text"):
        load_pairs(empty)
    man = train_dpo(ds, tmp_path / "base-format", small_dpo(max_steps=1))
    assert man["steps"] == 1 and man["rows"] == len(QS)


def test_a_launch_over_two_processes_trains_once_and_writes_once(stage1: Path, tmp_path: Path):
    """The 72B profile's path (train.launch: `accelerate launch` with the shipped FSDP config, one trainer per GPU)
    run on 2 CPU processes over gloo: each trains on its half of every batch, the main rank alone writes the log,
    resume checkpoints, adapter and manifest. A launch that fails says so with its log's last lines."""
    from cai_bootstrap.train.launch import LaunchFailed, launch

    pairs(8).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "stage2"
    man = launch("dpo", processes=2, cpu=True, data=str(tmp_path / "data"), out=str(out),
                 cfg=small_dpo(max_steps=2, resume_every=1), profile="tiny", parent=str(stage1))
    assert (man["processes"], man["steps"], man["reference"]) == (2, 2, "parent adapter (frozen copy 'ref')")
    log = _log(out / "train_log.jsonl")
    assert [(r["step"], r["epoch"]) for r in log] == [(1, 0.5), (2, 1.0)]  # 2 ranks x batch 2: 4 pairs a step
    assert json.loads((out / "manifest.json").read_text()) == man
    assert any(t.abs().max() > 0 for k, t in saved_adapter_tensors(out).items() if "lora_B" in k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "stage2", "stage2.launch.log"]  # no partial left

    # failures, on one process (what they report does not depend on how many fail)
    with pytest.raises(TrainError, match="missing"):  # the training's own input error, not a crash
        launch("dpo", processes=1, cpu=True, data=str(tmp_path / "missing"), out=str(tmp_path / "bad"),
               cfg=small_dpo(max_steps=1), profile="tiny")
    with pytest.raises(LaunchFailed, match="over 1 processes failed .*last lines"):
        launch("dpo", processes=1, cpu=True, data=str(tmp_path / "data"), out=str(tmp_path / "bad"),
               cfg=small_dpo(max_steps=1), profile="tiny", no_such_argument=1)
