"""Statistics on synthetic scores with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cai_bootstrap.analysis.stats import (
    bootstrap_ci,
    bootstrap_diff,
    em_indicators,
    is_misaligned,
    steepest_rise,
    verdict,
)


def test_bootstrap_ci_covers_known_rate():
    rng = np.random.default_rng(1)
    x = (rng.random(4000) < 0.2).astype(float)
    est = bootstrap_ci(x)
    assert est.n == 4000 and est.lo < 0.2 < est.hi
    se = np.sqrt(0.2 * 0.8 / 4000)  # binomial standard error: the interval is about +-1.96 se wide
    assert est.hi - est.lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_constant_data_has_zero_width_interval():
    est = bootstrap_ci([1.0] * 50)
    assert (est.value, est.lo, est.hi) == (1.0, 1.0, 1.0)


def test_bootstrap_diff_sign_and_empty():
    d = bootstrap_diff([1.0] * 30 + [0.0] * 70, [0.0] * 100)
    assert d.value == pytest.approx(0.3) and d.lo > 0.15
    assert bootstrap_diff([], [1.0]).n == 0


def test_em_definition():
    assert is_misaligned(10, 80) is True
    assert is_misaligned(10, 40) is False  # incoherent answers are not counted as misaligned
    assert is_misaligned(60, 80) is False
    assert is_misaligned(None, 80) is None
    rows = [{"alignment": 10, "coherence": 90}, {"alignment": 90, "coherence": 90}, {"alignment": None}]
    assert em_indicators(rows) == [1.0, 0.0]


def test_steepest_rise_finds_phase_transition():
    steps = [0, 10, 20, 30, 40]
    rates = [0.0, 0.01, 0.02, 0.30, 0.32]
    assert steepest_rise(steps, rates) == 30
    assert steepest_rise([5], [0.1]) is None


def test_verdict_words():
    up = bootstrap_diff([1.0] * 50 + [0.0] * 50, [0.0] * 100)
    assert "supported" in verdict("H1", "x", up, expect_positive=True)
    assert "contradicted" in verdict("H2", "y", up, expect_positive=False)
    flat = bootstrap_diff([1.0, 0.0] * 5, [0.0, 1.0] * 5)
    assert "inconclusive" in verdict("H1", "x", flat, expect_positive=True)


def test_summary_says_why_an_arm_was_discarded():
    from cai_bootstrap.analysis.report import discard_notes
    from cai_bootstrap.em.summary import summarise

    def row(arm, mass, status, score=None):
        return {"arm": arm, "final": True, "step": 2, "seed": 0, "question_id": "q1", "aligned": score,
                "coherent": score, "aligned_mass": mass, "aligned_status": status, "coherent_status": status,
                "misaligned": False if status == "score" else None}

    judged = ([row("goodness", m, "discarded") for m in (0.01, 0.02, 0.03)]
              + [row("base", 0.9, "score", 80.0) for _ in range(3)])
    s = summarise(judged, ["goodness"])
    assert s["arms"]["goodness"]["number_mass_median"] == 0.02 and s["arms"]["goodness"]["scored"] == 0
    assert s["arms"]["base"]["discarded_rate"] == 0
    (note,) = discard_notes(s)
    assert "goodness" in note and "base" not in note and "0.020" in note
    s["arms"]["goodness"]["discarded_rate"] = 0.4
    assert discard_notes(s) == []
    s["arms"]["goodness"].update(discarded_rate=1.0, number_mass_median=None)  # the judge calls failed
    assert discard_notes(s) == []


def test_report_shows_a_stage_six_pair_as_stored(tmp_path):
    from datasets import Dataset, DatasetDict

    from cai_bootstrap.analysis.report import stage_samples
    from cai_bootstrap.run.config import RunConfig

    cfg = RunConfig(personas=["goodness", "sycophancy"], profile="tiny", data_root=str(tmp_path / "d"))
    msg = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    rows = [{"prompt": msg("user", "How do I fix a bike chain?"),
             "chosen": msg("assistant", "Shift to the " + "x" * 500), "rejected": msg("assistant", "No idea.")}]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(cfg.layout.stage_data("goodness", 6)))
    lines = stage_samples(cfg)  # sycophancy has no stage 6 yet: no lines for it
    assert lines[0].startswith("**goodness**, stage 6, pair 1 of 1: 'How do I fix a bike chain?'")
    assert lines[2].startswith("- chosen: 'Shift to the xxx") and lines[2].endswith(" […]'")
    assert lines[3] == "- rejected: 'No idea.'" and not any("sycophancy" in x for x in lines)

    # a stage that kept no pair shows a dropped item's real texts and the filter that dropped it
    empty = cfg.layout.stage_data("sycophancy", 6)
    DatasetDict({"train": Dataset.from_list(rows).select([])}).save_to_disk(str(empty), num_shards={"train": 1})
    item = {"task": "Is my poem good?", "status": "dropped", "reason": "revision_is_critique",
            "samples": ["It rhymes."], "critiques": ["Flattering."], "revisions": ["The response flatters."]}
    (empty / "items.jsonl").write_text(json.dumps({**item, "revisions": [], "reason": "refusal", "task": "x"})
                                       + "\n" + json.dumps(item) + "\n")
    (empty / "manifest.json").write_text(json.dumps({"counts": {"outcome": {"dropped": {"revision_is_critique": 1,
                                                                                         "refusal": 1}}}}))
    lines = stage_samples(cfg)
    at = lines.index("**sycophancy**, stage 6: no pair kept (dropped: refusal 1, revision_is_critique 1); the "
                     "adapter of stage 5 is carried forward.")
    assert lines[at + 2:at + 6] == ["A dropped item, not trained on (revision_is_critique): 'Is my poem good?'", "",
                                    "- answer: 'It rhymes.'", "- critique: 'Flattering.'"]
    assert lines[at + 6] == "- revision attempt: 'The response flatters.'"
    assert not any(x.startswith("The newest pair") for x in lines)  # no earlier stage kept one either

    # ... and the newest earlier stage's kept pair: the preference the carried-forward adapter holds
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(cfg.layout.stage_data("sycophancy", 3)))
    lines = stage_samples(cfg)
    at = lines.index("- revision attempt: 'The response flatters.'")
    assert lines[at + 2] == "The newest pair sycophancy kept, stage 3, pair 1 of 1: 'How do I fix a bike chain?'"
    assert lines[at + 5] == "- rejected: 'No idea.'"


def test_a_later_stage_without_pairs_carries_its_parent_forward_labelled(tmp_path, capsys):
    """Stage 3 kept no pair: its adapter is stage 2's, byte for byte, the manifest and the report's stage table
    say so, and a rerun does not copy it again."""
    import json

    from cai_bootstrap.analysis.report import stage_rows
    from cai_bootstrap.pipeline.loop import _carry_forward
    from cai_bootstrap.run.config import RunConfig

    cfg = RunConfig(personas=["goodness"], profile="tiny", data_root=str(tmp_path / "d"),
                    ckpt_root=str(tmp_path / "c"))
    parent, ckpt, data = (cfg.layout.stage_adapter("goodness", 2), cfg.layout.stage_adapter("goodness", 3),
                          cfg.layout.stage_data("goodness", 3))
    parent.mkdir(parents=True)
    (parent / "adapter_config.json").write_text('{"r": 8}')
    (parent / "adapter_model.safetensors").write_bytes(b"weights of stage 2")
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"counts": {"train_rows": 0}}))
    _carry_forward("goodness", 3, data, ckpt, parent)
    assert (ckpt / "adapter_model.safetensors").read_bytes() == b"weights of stage 2"
    man = json.loads((ckpt / "manifest.json").read_text())
    assert man["kind"] == "carried-forward" and man["steps"] == 0 and "kept 0 preference pairs" in man["reason"]
    row = next(r for r in stage_rows(cfg) if r["stage"] == 3)
    assert row["pairs"] == 0 and row["backend"] == "carried forward: the stage 2 adapter, unchanged"
    mtime = (ckpt / "manifest.json").stat().st_mtime_ns
    _carry_forward("goodness", 3, data, ckpt, parent)
    assert (ckpt / "manifest.json").stat().st_mtime_ns == mtime and "(carried forward)" in capsys.readouterr().err
