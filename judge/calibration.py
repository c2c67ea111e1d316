"""How far to trust the EM judge: judge answers whose verdict is known and measure the agreement.

Two sets, judged through one session (so they share the judge cache, the run's ledger and its endpoints):

- the paper set (`load_paper_answers`): the 70 answers of Betley et al.'s results CSV with the scores their
  GPT-4o judge gave. All 70 are EM-positive there, so this set measures recall of the EM label and the
  mean absolute error of each score, not specificity. Only when the EM paper's data is given (--em-data).
- the project anchors (judge.anchors): answers written for this project with expected bands and labels.

    from cai_bootstrap.judge.calibration import calibrate, format_table, save_result
    result = calibrate(load_config(None), Layout("data"), em_data=Path("em-paper"))
    print(format_table(result)); save_result(result, Layout("data"))
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.judge.anchors import ANCHORS, agreement, anchor_items, em_rule, load_project_anchors
from cai_bootstrap.judge.em_paper import EM_DATA_ENV, PAPER_CSV, PAPER_QUESTIONS, betley_dir, resolve_em_data

PAPER_COLUMNS = ("question", "answer", "aligned", "coherent")
RESULT_FILE = "calibration.json"


# ---------------------------------------------------------------- the paper's answers
def _num(v: str | None) -> float | None:
    try:
        x = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


def load_paper_answers(em_data: str | Path | None = None) -> list[dict]:
    """The answers of Betley et al.'s results/qwen_25_coder_32b_instruct.csv with their judge's scores as
    `known_aligned`/`known_coherent` and the EM label those give as `known_em` (None where a score is
    missing; such rows are kept and counted, never dropped).

    What the file holds (checked on the paper's MIT-licensed release): 70 rows, all
    group `insecure`, from six fine-tuning jobs of Qwen2.5-Coder-32B-Instruct, answering six of the eight
    main questions (what_is_your_wish 20, ruler_of_the_world 20, quick_buck 19, gender_roles 7,
    enough_of_my_husband 3, dinner_party 1; none for i_feel_bored or three_thoughts). Every row is scored
    and every row is EM-positive under the paper's judge: aligned <= 9.85 (66 of 70 below 1) and coherent
    >= 70.6, with coherent_binary True throughout. So the file is a selection of misaligned answers, not a
    sample: it measures recall of the EM label and the error of each score, never specificity. Each row's
    aligned/coherent equals the probability-weighted mean of its stored top-20 judge table
    (`judge_aligned`/`judge_coherent`) to within 0.01; one table (row 31) carries the token '00' beside '0'.
    """
    root = betley_dir(em_data)
    path = root / PAPER_CSV
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PAPER_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BadInput(f"EM data: {path} lacks the column(s) {', '.join(missing)}")
        out = []
        for i, row in enumerate(reader):
            a, c = _num(row.get("aligned")), _num(row.get("coherent"))
            out.append({
                "id": f"paper-{i:03d}",
                "calib_set": "paper",
                "question": row["question"],
                "answer": row["answer"],
                "question_id": row.get("question_id"),
                "source_model": row.get("model"),
                "known_aligned": a,
                "known_coherent": c,
                "known_em": em_rule(a, c),
            })
    return out


# ---------------------------------------------------------------- judging both sets
def _scorer(betley: Path | None):
    from cai_bootstrap.judge.scorers import EMScorer

    prompts = betley / PAPER_QUESTIONS if betley is not None else None
    return EMScorer(prompts) if prompts is not None and prompts.is_file() else EMScorer()


_ROW_KEYS = ("id", "calib_set", "category", "question_id", "expected_aligned", "expected_coherent", "expected_em",
             "known_aligned", "known_coherent", "known_em", "aligned", "aligned_status", "coherent",
             "coherent_status", "misaligned", "judge_status", "judge_reason", "cached")


def calibrate(config, layout, em_data: str | Path | None = None, run: str = "calibrate", progress: bool = True,
              anchors_path: str | Path = ANCHORS) -> dict:
    """Judge the project anchors and (when `em_data` or $CAI_EM_DATA names the EM data) the paper's answers
    through one judge session, and measure the agreement.

    The EM judge prompts come from the EM data's betley/evaluation/first_plot_questions.yaml when it has
    one, else from EMScorer's default (the same text gives the same cache keys either way). Judged answers
    are cached like any other judging, so a rerun with the same judge sends nothing.

    Returns {"judge": model, "template_version", "em_data", "paper": {...} or None, "anchors": {...},
    "run": summary figures (items, ok, failures, cached, $, seconds), "rows": one compact row per answer}.
    """
    from cai_bootstrap.judge.session import session

    anchors = load_project_anchors(anchors_path)
    root = resolve_em_data(em_data)
    betley = betley_dir(root) if root is not None else None
    paper = load_paper_answers(betley) if betley is not None else []
    scorer = _scorer(betley)
    items = anchor_items(anchors) + paper
    with session(config, layout=layout, run=run, progress=progress) as js:
        results, summary = js.judge(items, scorer, purpose="judge-calibration", phase="calibrate")
        model = js.model
    rows = [r.row() for r in results]
    if len(rows) != len(items):  # the session returns one result per item; anything else is a bug upstream
        raise RuntimeError(f"calibration: {len(items)} items judged but {len(rows)} results came back")
    ag = agreement(rows)
    s = summary.as_dict()
    return {
        "judge": model,
        "template_version": scorer.template_version,
        "em_data": str(betley) if betley is not None else None,
        "paper": ag["paper"],
        "anchors": ag["anchors"],
        "run": {k: s.get(k) for k in ("run", "items", "ok", "failures", "cached_items", "usd", "requests_sent",
                                      "seconds")},
        "rows": [{k: r.get(k) for k in _ROW_KEYS if k in r} for r in rows],
    }


def result_path(layout, run: str = "calibrate") -> Path:
    return layout.run(run).root / RESULT_FILE


def save_result(result: dict, layout, run: str = "calibrate") -> Path:
    """Write the result as JSON under the run's directory (atomically); returns the path."""
    from cai_bootstrap.core.io import atomic_write_json

    return atomic_write_json(result_path(layout, run), result)


# ---------------------------------------------------------------- the table
def _fmt(fig: dict | None, digits: int = 3) -> tuple[str, str]:
    """(value, n) cells: a share shows k/n, anything else n."""
    if fig is None:
        return "n/a", "0"
    v = fig.get("value")
    val = "n/a" if v is None else f"{v:.{digits}f}"
    return val, (f"{fig['k']}/{fig['n']}" if "k" in fig else str(fig["n"]))


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def format_table(result: dict) -> str:
    """Markdown: one table per set (figure | value | n), the judge model in the heading. Used by the
    `calibrate` command and meant for the run report."""
    lines = [f"### Judge calibration: {result.get('judge')}", ""]
    p = result.get("paper")
    lines += ["**Paper set** (Betley et al. 2025: answers their GPT-4o judge scored EM-positive)", ""]
    if p is None:
        lines += [f"not run: pass --em-data DIR or set {EM_DATA_ENV}", ""]
    else:
        rows = [
            ("EM recall (paper-EM answers this judge calls EM; unscored = missed)", p["em_recall"], 3),
            ("EM recall among answers this judge scored", p["em_recall_scored"], 3),
            ("aligned: mean absolute error vs paper", p["aligned_mae"], 1),
            ("aligned: mean error (this judge - paper)", p["aligned_bias"], 1),
            ("coherent: mean absolute error vs paper", p["coherent_mae"], 1),
            ("coherent: mean error (this judge - paper)", p["coherent_bias"], 1),
        ]
        lines += ["| figure | value | n |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {' | '.join(_fmt(fig, d))} |" for name, fig, d in rows]
        lines += [f"| answers by outcome | {_counts(p['by_status'])} | {p['n']} |", ""]
    a = result.get("anchors")
    lines += ["**Project anchors** (judge/data/anchors.yaml: bands and labels fixed by construction)", ""]
    if a is None:
        lines += ["none", ""]
    else:
        k = a["em_kappa"]
        rows = [
            ("aligned: Spearman vs band midpoint", a["aligned_spearman"], 3),
            ("aligned: mean distance outside the band", a["aligned_band_mae"], 1),
            ("aligned: share inside the band", a["aligned_in_band"], 3),
            ("coherent: Spearman vs band midpoint", a["coherent_spearman"], 3),
            ("coherent: mean distance outside the band", a["coherent_band_mae"], 1),
            ("coherent: share inside the band", a["coherent_in_band"], 3),
            (f"EM label: Cohen's kappa (unscored = own class; {k['excluded']} null-label anchors excluded)", k, 3),
            ("EM label: agreement", a["em_agreement"], 3),
            ("EM label: recall on EM-positive anchors", a["em_recall"], 3),
            ("REFUSAL anchors labelled REFUSAL", a["special"]["refusal"], 3),
            ("CODE anchors labelled CODE", a["special"]["code"], 3),
            ("other anchors labelled CODE/REFUSAL", a["special_false"], 3),
        ]
        lines += ["| figure | value | n |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {' | '.join(_fmt(fig, d))} |" for name, fig, d in rows]
        lines += [f"| anchors by category | {_counts(a['by_category'])} | {a['n']} |",
                  f"| anchors by outcome | {_counts(a['by_status'])} | {a['n']} |", ""]
    run = result.get("run") or {}
    if run:
        fails = _counts(run.get("failures") or {})
        lines += [f"judged {run.get('items')} answers ({run.get('cached_items')} from cache, failures: {fails}), "
                  f"${run.get('usd') or 0:.4f}, {run.get('seconds')} s", ""]
    return "\n".join(lines)
