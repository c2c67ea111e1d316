"""Persona decomposition: activations of base vs EM models on questions over four dimensions (ideology,
moral foundations, technology/AI governance, financial risk), PCA and k-means with k chosen by silhouette,
and a clustering-quality table per layer; plus the EM shift (EM model minus base, per question), whose
spread says whether EM is one direction or several.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

QUESTIONS_DIR = Path(__file__).with_name("questions")
DIMENSIONS = ("ideology", "moral", "tech_ai", "financial")
MIN_PER_DIMENSION = 25


class QuestionError(ValueError):
    """A question file that cannot be used; the message names the file and entry."""


@dataclass
class ProbeQuestion:
    id: str
    dimension: str
    text: str


def load_probe_questions(folder: str | Path = QUESTIONS_DIR, per_dimension: int | None = None,
                         min_per_dimension: int = MIN_PER_DIMENSION) -> list[ProbeQuestion]:
    """Every `*.yaml` in `folder` ({dimension, questions: [text, ...]}); `per_dimension` keeps the first n."""
    folder = Path(folder)
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise QuestionError(f"no question files (*.yaml) in {folder}")
    out: list[ProbeQuestion] = []
    for f in files:
        try:
            data = yaml.safe_load(f.read_text())
        except yaml.YAMLError as e:
            raise QuestionError(f"{f}: not valid YAML: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("dimension"), str):
            raise QuestionError(f"{f}: needs a `dimension` name and a `questions` list")
        qs = data.get("questions")
        if not isinstance(qs, list) or len(qs) < min_per_dimension:
            raise QuestionError(f"{f}: `questions` must be a list of at least {min_per_dimension} strings")
        for i, q in enumerate(qs):
            if not isinstance(q, str) or not q.strip():
                raise QuestionError(f"{f}: question #{i} is not a non-empty string")
        for i, q in enumerate(qs[:per_dimension]):
            out.append(ProbeQuestion(id=f"{data['dimension']}-{i:02d}", dimension=data["dimension"], text=q))
    return out


def choose_k(x: np.ndarray, ks: Sequence[int] = range(2, 9), seed: int = 0) -> tuple[int, np.ndarray, dict[int, float]]:
    """(k with the best silhouette, its labels, {k: silhouette}); ks beyond n-1 are skipped."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score

    scores, labels = {}, {}
    for k in ks:
        if not 2 <= k < len(x):
            continue
        with warnings.catch_warnings():  # fewer distinct points than k: that k just scores badly or is skipped
            warnings.simplefilter("ignore", ConvergenceWarning)
            lab = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        if len(set(lab)) < 2:
            continue
        scores[k], labels[k] = float(silhouette_score(x, lab)), lab
    if not scores:
        raise ValueError(f"cannot cluster {len(x)} rows with k in {list(ks)}")
    best = max(scores, key=scores.get)
    return best, labels[best], scores


def pca_kmeans(x: np.ndarray, ks: Sequence[int] = range(2, 9), n_components: int = 10, seed: int = 0) -> dict:
    """Standardise, PCA (clustering on the leading components drops noise dimensions), k-means by silhouette."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(x)
    pca = PCA(n_components=min(n_components, *z.shape), random_state=seed)
    coords = pca.fit_transform(z)
    k, labels, scores = choose_k(coords, ks, seed)
    return {"coords": coords, "labels": labels, "k": k, "silhouette": scores[k], "silhouettes": scores,
            "explained": pca.explained_variance_ratio_.tolist()}


def ari(a: Sequence, b: Sequence) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(list(a), list(b)))


def shift_analysis(base: np.ndarray, shifted: Sequence[np.ndarray], seed: int = 0) -> dict:
    """EM shifts (model - base, per question, all EM models pooled): one direction or several?

    `pc1_share`: variance share of the first principal component of the shifts (uncentred, so a common
    shift counts); `mean_cos`: mean cosine of each shift to the mean shift; k/silhouette of the unit shifts.
    """
    d = np.concatenate([s - base for s in shifted], 0)
    unit = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-8)
    sv = np.linalg.svd(d, compute_uv=False)
    mean = unit.mean(0)
    mean /= max(np.linalg.norm(mean), 1e-8)
    out = {"pc1_share": float(sv[0] ** 2 / max((sv ** 2).sum(), 1e-12)), "mean_cos": float((unit @ mean).mean()),
           "mean_norm": float(np.linalg.norm(d, axis=1).mean())}
    try:
        k, _, scores = choose_k(unit, range(2, 7), seed)
        out |= {"k": k, "silhouette": scores[k]}
    except ValueError:
        out |= {"k": None, "silhouette": None}
    return out


def quality_table(acts: dict[str, np.ndarray], dims: Sequence[str], layers: Sequence[int], base: str,
                  ks: Sequence[int] = range(2, 9), seed: int = 0) -> tuple[list[dict], dict[int, dict]]:
    """Per layer: k-means over every model's activations pooled (rows model x question), its k/silhouette,
    agreement (ARI) of the clusters with the question dimension and with the model; and the EM shift
    statistics. `acts[model]` is [questions, layers, hidden] in the order of `dims`; `base` names the base."""
    rows, fits = [], {}
    models = list(acts)
    for li, layer in enumerate(layers):
        x = np.concatenate([acts[m][:, li] for m in models], 0)
        fit = pca_kmeans(x, ks, seed=seed)
        dim_lab = [d for _ in models for d in dims]
        model_lab = [m for m in models for _ in dims]
        row = {"layer": layer, "k": fit["k"], "silhouette": fit["silhouette"],
               "ari_dimension": ari(fit["labels"], dim_lab),
               "ari_model": ari(fit["labels"], model_lab), "pc1": fit["explained"][0]}
        em = [acts[m][:, li] for m in models if m != base]
        if em:
            sh = shift_analysis(acts[base][:, li], em, seed)
            row |= {f"shift_{k}": v for k, v in sh.items()}
        rows.append(row)
        fits[layer] = fit | {"dims": dim_lab, "models": model_lab}
    return rows, fits
