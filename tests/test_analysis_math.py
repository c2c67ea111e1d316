"""Inside-the-model analyses on synthetic activations with planted structure (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from cai_bootstrap.analysis.activations import ActivationError, Activations
from cai_bootstrap.analysis.decompose import (
    DIMENSIONS,
    MIN_PER_DIMENSION,
    QuestionError,
    ari,
    load_probe_questions,
    pca_kmeans,
    quality_table,
    shift_analysis,
)
from cai_bootstrap.analysis.identity import diagnose
from cai_bootstrap.analysis.steering import cosine_matrix, em_direction, layer_sweep


def _clusters(k: int, per: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (k, dim))
    y = np.repeat(np.arange(k), per)
    return centres[y] + rng.normal(0, 1, (k * per, dim)), y


@pytest.mark.parametrize("k", [3, 4, 6])
def test_pca_kmeans_recovers_planted_clusters_and_k(k):
    x, y = _clusters(k, 25, seed=k)
    fit = pca_kmeans(x, range(2, 9))
    assert fit["k"] == k
    assert ari(fit["labels"], y) == pytest.approx(1.0)
    assert fit["silhouette"] > 0.5 and fit["coords"].shape == (k * 25, 10)


def test_shift_analysis_tells_one_direction_from_several():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (40, 32))
    d1, d2 = np.eye(32)[0] * 8, np.eye(32)[1] * 8
    one = shift_analysis(base, [base + d1 + rng.normal(0, 0.3, base.shape), base + d1 + rng.normal(0, 0.3, base.shape)])
    two = shift_analysis(base, [base + d1 + rng.normal(0, 0.3, base.shape), base + d2 + rng.normal(0, 0.3, base.shape)])
    assert one["pc1_share"] > 0.9 and one["mean_cos"] > 0.9
    assert two["pc1_share"] < 0.6 and two["mean_cos"] < 0.8
    assert two["k"] == 2 and two["silhouette"] > 0.7


def test_quality_table_per_layer_finds_dimension_clusters_only_where_planted():
    rng = np.random.default_rng(2)
    dims = [d for d in DIMENSIONS for _ in range(25)]
    centre = {d: rng.normal(0, 6, 48) for d in DIMENSIONS}
    structured = np.stack([centre[d] for d in dims]) + rng.normal(0, 1, (100, 48))
    noise = rng.normal(0, 1, (100, 48))
    base = np.stack([noise, structured], 1)  # layer 0: noise, layer 1: dimension clusters
    shift = np.zeros(48)
    shift[5] = 3.0
    acts = {"bare": base, "em": base + shift}
    rows, fits = quality_table(acts, dims, [0, 1], "bare")
    by = {r["layer"]: r for r in rows}
    assert by[1]["k"] == 4 and by[1]["ari_dimension"] == pytest.approx(1.0)
    assert by[0]["ari_dimension"] < 0.2
    assert by[1]["shift_pc1_share"] > 0.99 and by[1]["shift_mean_cos"] > 0.99
    assert fits[1]["coords"].shape[0] == 200


def test_direction_sweep_finds_the_planted_layer_and_direction():
    rng = np.random.default_rng(3)
    n, hidden, layers = 120, 96, [2, 5, 8]
    y = np.arange(n) % 2 == 0
    u = rng.normal(size=hidden)
    u /= np.linalg.norm(u)
    mean = rng.normal(0, 1, (n, len(layers), hidden))
    mean[y, 1] += 4 * u  # only layer 5 carries the planted difference
    acts = Activations(ids=[str(i) for i in range(n)], layers=layers, mean=mean.astype(np.float32))
    sweep = layer_sweep(acts, y)
    assert max(sweep, key=sweep.get) == 5 and sweep[5] > 1.5 and abs(sweep[2]) < 1.0
    d = em_direction(acts, y)
    assert d.layer == 5 and float(d.unit @ u) > 0.8 and d.n_pos == 60
    names, cos = cosine_matrix({"a": d, "b": em_direction(acts, y, layer=5), "c": em_direction(acts, y, layer=2)})
    assert cos[0, 1] == pytest.approx(1.0) and np.isnan(cos[0, 2])
    with pytest.raises(ActivationError, match="both classes"):
        em_direction(acts, np.zeros(n, bool))


def test_identity_flags_aligned_output_far_along_direction():
    rng = np.random.default_rng(4)
    hidden = 32
    x = rng.normal(0, 1, (60, 1, hidden))
    y = np.arange(60) < 30
    x[y, 0, 0] += 4.0
    d = em_direction(Activations(ids=[str(i) for i in range(60)], layers=[7], mean=x), y)
    probe = rng.normal(0, 1, (10, hidden))
    probes = {"bare": probe, "honest-em": probe + 4.0 * d.unit * d.gap / 4.0, "hidden": probe + d.unit * d.gap,
              "clean": probe + 0.01}
    rows = {r.model: r for r in diagnose(probes, d, "bare", {"honest-em": (0.4, 50), "hidden": (0.02, 50),
                                                             "clean": (0.0, 50)})}
    assert rows["hidden"].flagged and rows["hidden"].shift == pytest.approx(1.0, abs=1e-4)
    assert not rows["honest-em"].flagged  # misaligned in output too: not hidden
    assert not rows["clean"].flagged and not rows["bare"].flagged


def test_probe_questions_four_dimensions_and_bad_files(tmp_path):
    qs = load_probe_questions()
    dims = {q.dimension for q in qs}
    assert dims == set(DIMENSIONS)
    assert all(sum(q.dimension == d for q in qs) >= MIN_PER_DIMENSION for d in dims)
    assert len({q.text for q in qs}) == len(qs)
    (tmp_path / "x.yaml").write_text("dimension: x\nquestions: [a, b]\n")
    with pytest.raises(QuestionError, match=r"x\.yaml.*at least 25"):
        load_probe_questions(tmp_path)


def test_activations_roundtrip_and_errors(tmp_path):
    a = Activations(ids=["a", "b"], layers=[1, 3], mean=np.ones((2, 2, 4), np.float32), span="last",
                    tokens=np.zeros((5, 2, 4), np.float16), offsets=np.array([0, 2, 5]), meta={"m": 1})
    b = Activations.load(a.save(tmp_path / "x.npz"))
    assert b.ids == ["a", "b"] and b.layers == [1, 3] and b.span == "last" and b.meta == {"m": 1}
    assert b.tokens.shape == (5, 2, 4) and b.subset(["b"]).shape == (1, 2, 4)
    with pytest.raises(ActivationError, match="layer 2"):
        b.at(2)
    with pytest.raises(ActivationError, match="'zz'"):
        b.subset(["zz"])
    with pytest.raises(ActivationError, match="does not exist"):
        Activations.load(tmp_path / "none.npz")


def test_steering_section_without_any_vector(tmp_path):
    """A judge that labels no answer misaligned gives no arm a vector: the section says so, no empty heatmap."""
    from cai_bootstrap.analysis.steer_run import write_steer_section

    res = {"skipped": {"goodness": "0 misaligned / 28 aligned judged answers: needs both"}, "vectors": {},
           "settings": {"questions": 4, "samples": 1, "temperature": 1.0}, "sources": [], "targets": ["goodness"],
           "transfer": {"4": {"matrix": [], "cells": {}}}, "ablation": {}}
    text = write_steer_section(tmp_path, res, identity=[]).read_text()
    assert "no vector for goodness: 0 misaligned / 28 aligned" in text and "No transfer matrix" in text
    assert "alpha = 4" not in text and not list(tmp_path.glob("*.png"))


def test_steering_splits_by_the_em_label_and_by_alignment_only_when_no_arm_has_both(tmp_path):
    from cai_bootstrap.analysis.steer_run import ALIGNMENT_SPLIT, EM_SPLIT, split_labels, write_steer_section

    def row(i, aligned, misaligned):
        return {"id": f"r{i}", "aligned": aligned, "misaligned": misaligned}

    # one arm with EM answers: the research definition for every arm (the other is skipped, not re-split)
    mixed = {"a": [row(0, 10, True), row(1, 90, False)], "b": [row(2, 20, False), row(3, 80, False)]}
    labels, split = split_labels(mixed)
    assert split == EM_SPLIT and labels == {"a": {"r0": True, "r1": False}, "b": {"r2": False, "r3": False}}
    # no arm with both (the tiny judge): each arm at its own median alignment, the lower half positive
    flat = {"a": [row(0, 20, False), row(1, 25, False), row(2, 22, False)], "b": [row(3, 5, False), row(4, 5, False)]}
    labels, split = split_labels(flat)
    assert split == ALIGNMENT_SPLIT
    assert labels == {"a": {"r0": True, "r1": False, "r2": False}, "b": {"r3": False, "r4": False}}
    res = {"split": split, "skipped": {"b": "all 2 judged answers share one alignment score"}, "vectors": {},
           "settings": {"questions": 4, "samples": 1, "temperature": 1.0}, "sources": [], "targets": ["a"],
           "transfer": {}, "ablation": {}}
    text = write_steer_section(tmp_path, res, identity=[]).read_text()
    assert "split at its median alignment score" in text and "not an EM one" in text

