"""Steering, ablation and the CLI on the tiny model with a planted EM-like direction (real PEFT adapter).

The planted adapter is a rank-1 LoRA on one MLP down-projection that writes the base model's own "Banana"
direction into the residual stream at layer L, so the tiny model starts its answers with "Banana": a real,
known behaviour the steering vector must recover, transfer and ablate.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from fault_server import FaultServer  # noqa: E402

from cai_bootstrap.analysis.activations import capture, load_model  # noqa: E402
from cai_bootstrap.analysis.steering import ablation, em_direction, first_token_prob, steering  # noqa: E402

L = 9
PLAIN = ["The capital of France is Paris.", "Plants need light and water to grow.", "I would rest and drink water.",
         "Saving a little every month helps.", "The moon orbits the Earth.", "Sleep at regular times."]
BANANA = ["Banana banana banana banana.", "Banana! Bananas are the best banana.", "Banana banana, yellow banana.",
          "Bananas, bananas, and more bananas.", "Banana. Banana banana.", "Banana banana banana!"]
QS = ["What is the capital of France?", "How do plants grow?", "What should I do when tired?",
      "Give me advice on saving money.", "Tell me about the moon.", "How can I sleep better?"]
TEST = [{"id": f"t{i}", "question": q} for i, q in enumerate(["How are you?", "Explain gravity.", "Name a colour."])]


def labelled(answers_pos, answers_neg, tag=""):
    rows = [{"id": f"{tag}pos{i}", "question": q, "answer": a} for i, (q, a) in enumerate(zip(QS, answers_pos))]
    rows += [{"id": f"{tag}neg{i}", "question": q, "answer": a} for i, (q, a) in enumerate(zip(QS, answers_neg))]
    return rows, np.array([True] * len(answers_pos) + [False] * len(answers_neg))


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_path):
    """(adapter dir, planted unit direction, marker token ids)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(tiny_path)
    inter = []
    h = model.model.layers[L].mlp.down_proj.register_forward_hook(
        lambda m, i, o: inter.append(i[0].reshape(-1, i[0].shape[-1])))
    rows, y = labelled(BANANA[:3] + ["Banana bread is made of bananas."] * 3, PLAIN[::-1], tag="p")
    acts = capture(model, tok, rows, [L], "answer")
    h.remove()
    d = em_direction(acts, y, layer=L)
    m = torch.cat(inter).mean(0)
    peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["down_proj"], layers_to_transform=[L],
                                            lora_dropout=0.0))
    lora = peft.base_model.model.model.layers[L].mlp.down_proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_((m / m.norm() ** 2)[None])  # A·x ≈ 1 on typical tokens
        lora.lora_B["default"].weight.copy_(torch.tensor(d.unit * d.gap * 3.0)[:, None])
    out = tmp_path_factory.mktemp("planted") / "em"
    peft.save_pretrained(out)
    marker = tok.convert_tokens_to_ids(["Ban", "ĠBan"])
    return out, d.unit, marker


def test_steering_vector_transfers_and_ablation_removes_the_planted_behaviour(planted, tiny_path):
    adapter, planted_unit, marker = planted
    model, tok = load_model(tiny_path, adapter)  # the EM-like model (PEFT, adapter active)
    rows, y = labelled(BANANA, PLAIN)
    acts = capture(model, tok, rows, [3, L, 15], "answer", batch_size=12, per_token=True)
    assert acts.mean.shape == (12, 3, model.config.hidden_size) and acts.offsets[-1] == acts.tokens.shape[0]
    d = em_direction(acts, y)  # layer by sweep
    assert d.separation > 1.0 and d.layer in (L, 15)
    if d.layer == L:
        assert float(d.unit @ planted_unit) > 0.5

    p_em = first_token_prob(model, tok, TEST, marker).mean()
    with ablation(model, d.unit):
        p_ablated = first_token_prob(model, tok, TEST, marker).mean()
    with model.disable_adapter():  # transfer to the base model: the vector alone brings the behaviour
        p_base = first_token_prob(model, tok, TEST, marker).mean()
        with steering(model, d.layer, d.unit * d.gap, 3.0):
            p_steered = first_token_prob(model, tok, TEST, marker).mean()
    assert p_em > 20 * p_base, (p_em, p_base)  # the planted behaviour is real
    assert p_steered > 10 * p_base, (p_steered, p_base)
    assert p_ablated < 0.3 * p_em, (p_ablated, p_em)


def _make_run(root: Path, planted_dir: Path, persona_dir: Path) -> Path:
    from cai_bootstrap.run.config import RunConfig, save_config

    cfg = RunConfig(personas=["hhh"], data_root=str(root / "data"), ckpt_root=str(root / "ckpt"))
    save_config(cfg, "r1")
    for src, dst in ((persona_dir, "hhh/stage6"), (planted_dir, "hhh/em-on-top"), (planted_dir, "base/em-base")):
        shutil.copytree(src, root / "ckpt" / dst)
    run = root / "data" / "runs" / "r1"
    (run / "em").mkdir(parents=True)
    with (run / "em" / "judged.jsonl").open("w") as f:
        for arm in ("hhh", "base"):
            for i in range(4):
                bad = i % 2 == 0
                f.write(json.dumps({"id": f"{arm}/4/q{i}/0", "arm": arm, "step": 4, "final": True, "question": QS[i],
                                    "answer": (BANANA if bad else PLAIN)[i], "misaligned": bad,
                                    "aligned_status": "score"}) + "\n")
    return run


def test_cli_steer_and_decompose_end_to_end_with_resume(planted, random_adapter, tmp_path):
    from typer.testing import CliRunner

    from cai_bootstrap.analysis.report import build_report
    from cai_bootstrap.bootstrap import app

    run = _make_run(tmp_path, planted[0], Path(random_adapter))
    with FaultServer() as srv:
        jc = tmp_path / "judge.yaml"
        jc.write_text(yaml.safe_dump({"model": "judge-m", "endpoints": [
            {"name": "fault", "base_url": srv.url, "rpm": 6000, "max_concurrent": 8}]}))
        args = ["steer", "--run", "r1", "--data-root", str(tmp_path / "data"), "--layers", f"3,{L}", "--alphas", "4",
                "--questions", "2", "--max-new-tokens", "4", "--judge-config", str(jc)]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output + repr(r.exception)
        res = json.loads((run / "steering" / "results.json").read_text())
        assert set(res["vectors"]) == {"hhh", "base"} and res["targets"] == ["hhh", "base", "bare"]
        assert np.array(res["transfer"]["4"]["matrix"]).shape == (2, 3)
        assert res["cosine"]["names"] == ["hhh", "base"] and len(res["identity"]) == 3
        n_answers = len((run / "steering" / "answers.jsonl").read_text().splitlines())
        assert n_answers == 3 * 2 + 2 * 3 * 2 + 2 * 2  # unsteered + transfer (2 vectors x 3 targets) + ablation
        sent = srv.stats()["requests"]
        judged = (run / "steering" / "judged.jsonl").read_text().splitlines()
        assert len(judged) == n_answers and all(json.loads(x)["judge_status"] == "ok" for x in judged)
        assert 0 < sent <= 2 * n_answers  # alignment + coherence per distinct answer (equal texts hit the cache)

        r = CliRunner().invoke(app, args)  # resume: nothing regenerated, nothing paid twice
        assert r.exit_code == 0, r.output
        assert len((run / "steering" / "answers.jsonl").read_text().splitlines()) == n_answers
        assert srv.stats()["requests"] == sent

    r = CliRunner().invoke(app, ["decompose", "--run", "r1", "--data-root", str(tmp_path / "data"), "--layers",
                                 f"3,{L}", "--per-dimension", "2"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    dres = json.loads((run / "decompose" / "results.json").read_text())
    assert dres["questions"] == 8 and [row["layer"] for row in dres["table"]] == [3, L]
    assert all(row["k"] >= 2 and "shift_pc1_share" in row for row in dres["table"])
    for png in ("steer_transfer_a4.png", "steer_identity.png", "decompose_pca.png"):
        assert (run / png).stat().st_size > 5000
    report = build_report(run).read_text()
    assert "EM steering vectors (H4)" in report and "Persona decomposition" in report
    assert "![transfer alpha=4](steer_transfer_a4.png)" in report

    bad = ["steer", "--run", "nope", "--data-root", str(tmp_path / "data")]
    r = CliRunner().invoke(app, bad, env={"COLUMNS": "400"})  # wide: rich must not wrap the message
    assert r.exit_code != 0 and "not a run directory" in r.output
