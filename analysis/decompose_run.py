"""`bootstrap.py em decompose`: the bare base and every arm's EM model read the four-dimension probe questions;
per layer, PCA + k-means (k by silhouette) over all models pooled, and the EM shift statistics. Outputs under
`data/runs/<id>/decompose/`, the PCA figure and the report section under the run directory.
Activations are saved per model, so a killed run resumes without recomputing finished models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cai_bootstrap.analysis.activations import Activations, capture, load_model
from cai_bootstrap.analysis.decompose import QUESTIONS_DIR, load_probe_questions, quality_table
from cai_bootstrap.analysis.run_models import BARE, run_models
from cai_bootstrap.analysis.steer_run import default_layers
from cai_bootstrap.core.console import console
from cai_bootstrap.core.io import atomic_write_json, atomic_write_text
from cai_bootstrap.run.layout import RunPaths


def run_decompose(run_path: Path, layers: Sequence[int] | None = None, questions_dir: Path = QUESTIONS_DIR,
                  per_dimension: int | None = None, batch_size: int = 16, seed: int = 0) -> dict:
    from cai_bootstrap.engine.models import get_profile, resolve_model

    run_path = Path(run_path)
    run_id, cfg, models = run_models(run_path)
    qs = load_probe_questions(questions_dir, per_dimension)
    items = [{"id": q.id, "question": q.text} for q in qs]
    out = RunPaths(run_path).decompose
    out.mkdir(parents=True, exist_ok=True)
    acts: dict[str, Activations] = {}
    for name, adapter in models.items():
        path = out / f"{name}.npz"
        if path.is_file():
            a = Activations.load(path)
            if a.ids == [it["id"] for it in items] and (not layers or a.layers == list(layers)):
                acts[name] = a
                continue
        console.print(f"decompose: activations of {name} on {len(items)} probe questions")
        model, tok = load_model(resolve_model(cfg.profile), adapter)
        lay = list(layers) if layers else default_layers(model.config.num_hidden_layers)
        acts[name] = capture(model, tok, items, lay, "last", batch_size, progress=True,
                             template_kwargs=get_profile(cfg.profile).chat_template_kwargs)
        acts[name].save(path)
        del model
    lay = acts[BARE].layers
    rows, fits = quality_table({n: a.mean for n, a in acts.items()}, [q.dimension for q in qs], lay, BARE, seed=seed)
    best = max(rows, key=lambda r: r["ari_dimension"])["layer"]
    res = {"run": run_id, "models": list(models), "questions": len(qs),
           "dimensions": sorted({q.dimension for q in qs}), "table": rows, "best_layer": best}
    atomic_write_json(out / "results.json", res, indent=1)
    write_decompose_section(run_path, res, fits[best])
    return res


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.2f}"


def write_decompose_section(run_path: Path, res: dict, fit: dict) -> Path:
    from cai_bootstrap.analysis.figures import pca_scatter

    name = pca_scatter(fit["coords"], fit["labels"], fit["dims"], fit["models"], res["best_layer"], run_path,
                       "decompose_pca.png")
    lines = ["## Persona decomposition", "",
             f"{res['questions']} probe questions over {', '.join(res['dimensions'])}; models: "
             f"{', '.join(res['models'])} (the last prompt token's residual stream). Per layer: k-means on the first"
             " 10 principal components of all models' activations pooled, k by silhouette; ARI of the clusters with"
             " the question dimension and with the model. EM shift = EM model minus bare base per question: the"
             " share of its variance on one axis (PC1), its mean cosine to the mean shift, and k by silhouette"
             " of the unit shifts. One EM direction: PC1 share near 1 and mean cosine near 1.", "",
             "| layer | k | silhouette | ARI dimension | ARI model | shift PC1 share | shift mean cos"
             " | shift k (sil.) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["table"]:
        lines.append(f"| {r['layer']} | {r['k']} | {_f(r['silhouette'])} | {_f(r['ari_dimension'])} |"
                     f" {_f(r['ari_model'])} | {_f(r.get('shift_pc1_share'))} | {_f(r.get('shift_mean_cos'))} |"
                     f" {r.get('shift_k')} ({_f(r.get('shift_silhouette'))}) |")
    lines += ["", f"![PCA at layer {res['best_layer']}]({name})"]
    return atomic_write_text(RunPaths(run_path).report_sections / "decompose.md", "\n".join(lines) + "\n")
