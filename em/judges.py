"""How far the EM judge is to be trusted: the project's anchors judged beside every run, and a second judge on the
same stored answers with its agreement (no generation)."""

from __future__ import annotations

from pathlib import Path

from cai_bootstrap.core.errors import MissingInput
from cai_bootstrap.core.io import atomic_write_json, atomic_write_jsonl
from cai_bootstrap.em.summary import summarise
from cai_bootstrap.run.config import RunConfig


def judge_anchors(judge, scorer, n: int | None = None) -> dict:
    """The project's anchors (answers with score bands by construction) judged beside every EM run, so a
    judge that cannot judge shows in the report; cached like any judgment. `n`: a share stratified by
    category (the demos), None: all of them; the agreement says how many of how many were judged."""
    from cai_bootstrap.judge.anchors import agreement, anchor_items, load_project_anchors, stratified

    every = load_project_anchors()
    chosen = stratified(every, n)
    results, _ = judge.judge(anchor_items(chosen), scorer, purpose="em-anchors", phase="calibrate")
    return agreement([r.row() for r in results])["anchors"] | {"of": len(every)}


def judge_agreement(a: list[dict], b: list[dict]) -> dict:
    """Two judges on the same answers: Cohen's kappa on the EM label where both scored, Spearman on alignment."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    other = {r["id"]: r for r in b}
    both = [(r, other[r["id"]]) for r in a if r["id"] in other]
    labels = [(x["misaligned"], y["misaligned"]) for x, y in both
              if x.get("misaligned") is not None and y.get("misaligned") is not None]
    aligned = [(x["aligned"], y["aligned"]) for x, y in both if x.get("aligned") is not None
               and y.get("aligned") is not None]
    kappa = cohen_kappa_score(*zip(*labels)) if len({v for p in labels for v in p}) > 1 else None
    rho = spearmanr(*zip(*aligned)).statistic if len(aligned) > 2 else None
    rho = None if rho is None or rho != rho else rho  # constant scores give NaN: no figure, not NaN in JSON
    return {"answers": len(both), "em_label_n": len(labels), "kappa": None if kappa is None else round(float(kappa), 4),
            "em_label_agree": round(sum(x == y for x, y in labels) / len(labels), 4) if labels else None,
            "aligned_n": len(aligned), "aligned_spearman": None if rho is None else round(float(rho), 4)}


def rescore(cfg: RunConfig, run_id: str, judge_config: Path, budget_usd: float | None = None) -> dict:
    """Judge a run's stored EM answers with another judge: its own judged rows, summary and anchors under
    em/judges/<model>/, and its agreement with the run's judge. Generates nothing."""
    from cai_bootstrap.core.io import read_jsonl
    from cai_bootstrap.judge.scorers import EMScorer
    from cai_bootstrap.judge.session import session

    paths = cfg.run(run_id)
    if not paths.em_answers.is_file() or not paths.em_judged.is_file():
        raise MissingInput(f"run {run_id} has no EM answers and judgments yet ({paths.em}): run `em` first")
    rows, first = read_jsonl(paths.em_answers), read_jsonl(paths.em_judged)
    prompts = (_read_summary(paths) or {}).get("judge_prompts")  # the run's judge prompts: a file, or ours
    scorer = EMScorer(prompts if prompts and prompts != "project rubrics" else None)
    with session(judge_config, layout=cfg.layout, run=run_id, budget_usd=budget_usd) as judge:
        results, summary = judge.judge(rows, scorer, purpose="em-rescore")
        anchors = judge_anchors(judge, scorer, cfg.counts.em_anchors)
        model = judge.model
    judged = [r.row() for r in results]
    out = paths.em_judge(model)
    atomic_write_jsonl(out / "judged.jsonl", judged)
    result = summarise(judged, cfg.personas) | {"judge": summary.as_dict(), "anchors": anchors,
                                               "agreement": judge_agreement(first, judged), "model": model}
    atomic_write_json(out / "summary.json", result, indent=1)
    return result


def _read_summary(paths) -> dict | None:
    import json

    return json.loads(paths.em_summary.read_text()) if paths.em_summary.is_file() else None
