"""PNG figures of the inside-the-model analyses (matplotlib, Agg): transfer heatmap, PCA scatter,
projection-vs-EM scatter. Each returns the file name relative to the run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def transfer_heatmap(mat: np.ndarray, sources: Sequence[str], targets: Sequence[str], alpha: float,
                     out: Path, name: str) -> str:
    fig, ax = plt.subplots(figsize=(1.2 * len(targets) + 2.5, 0.8 * len(sources) + 1.8))
    v = np.nanmax(np.abs(mat)) if np.isfinite(mat).any() else 1.0
    im = ax.imshow(mat * 100, cmap="RdBu_r", vmin=-v * 100 or -1, vmax=v * 100 or 1)
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_yticks(range(len(sources)), sources)
    for i in range(len(sources)):
        for j in range(len(targets)):
            ax.text(j, i, "n/a" if not np.isfinite(mat[i, j]) else f"{mat[i, j] * 100:+.0f}", ha="center",
                    va="center", fontsize=8)
    ax.set_xlabel("model steered (target)")
    ax.set_ylabel("vector from (source)")
    ax.set_title(f"EM-rate change (pp) when adding the vector, alpha={alpha:g}")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def pca_scatter(coords: np.ndarray, clusters: Sequence[int], dims: Sequence[str], models: Sequence[str],
                layer: int, out: Path, name: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = dict(zip(sorted(set(models)), "os^Dvx*P"))
    for ax, labels, title in ((axes[0], [f"cluster {c}" for c in clusters], "k-means cluster"),
                              (axes[1], list(dims), "question dimension")):
        cats = sorted(set(labels))
        cmap = plt.get_cmap("tab10")
        for ci, c in enumerate(cats):
            for m, mk in markers.items():
                idx = [i for i, (lab, mm) in enumerate(zip(labels, models)) if lab == c and mm == m]
                if idx:
                    ax.scatter(coords[idx, 0], coords[idx, 1], s=14, marker=mk, color=cmap(ci % 10),
                               label=f"{c} / {m}" if len(markers) > 1 else c, alpha=0.75)
        ax.set_title(f"PCA at layer {layer}, coloured by {title}")
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def projection_scatter(rows: Sequence, out: Path, name: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        y = r.em_rate * 100 if r.em_rate is not None else np.nan
        ax.scatter([r.shift], [y], s=40, color="#c44e52" if r.flagged else "#4c72b0")
        ax.annotate(r.model, (r.shift, 0 if np.isnan(y) else y), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("shift along the EM direction (units of the misaligned-aligned gap; base = 0)")
    ax.set_ylabel("output EM rate (%)")
    ax.set_title("Identity vs output (red: aligned in output, far along EM direction)")
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
