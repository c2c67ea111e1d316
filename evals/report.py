"""The run report's stage-over-stage section: one figure (win rate vs previous and vs base, adherence,
capability accuracy, unsafe and over-refusal rates across stages, each with its 95% interval) and a table
of the same numbers, written to `data/runs/<run>/report_sections/20-stage-eval-<persona>.md`."""

from __future__ import annotations

import math
from pathlib import Path

from cai_bootstrap.core.io import atomic_write_text
from cai_bootstrap.run.layout import RunPaths

PANELS = [  # (title, getter of an Estimate dict from a stage result, y-limits)
    ("win rate vs previous stage", lambda r: (r["pairwise"].get("vs_previous") or {}).get("win_rate"), (0, 1)),
    ("win rate vs base", lambda r: (r["pairwise"].get("vs_base") or {}).get("win_rate"), (0, 1)),
    ("persona adherence (1-10)", lambda r: r.get("adherence"), (1, 10)),
    ("capability accuracy", lambda r: (r.get("capability") or {}).get("accuracy"), (0, 1)),
    ("unsafe-answer rate (harmful)", lambda r: r["safety"]["unsafe_rate"], (0, 1)),
    ("over-refusal rate (harmless)", lambda r: r["safety"]["over_refusal_rate"], (0, 1)),
]


def _ok(e: dict | None) -> bool:
    return bool(e) and bool(e.get("n")) and e.get("value") is not None and not math.isnan(e["value"])


def _fmt(e: dict | None, digits: int = 2) -> str:
    if not _ok(e):
        return "n/a"
    return f"{e['value']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}] (n={e['n']})"


def plot(per_stage: dict[str, dict], out: Path, persona: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    stages = sorted(int(k) for k in per_stage)
    for ax, (title, get, ylim) in zip(axes.flat, PANELS, strict=True):
        xs, ys, lo, hi = [], [], [], []
        for k in stages:
            e = get(per_stage[str(k)])
            if _ok(e):
                xs.append(k)
                ys.append(e["value"])
                lo.append(e["value"] - e["lo"])
                hi.append(e["hi"] - e["value"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if "win rate" in title:
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(*ylim)
        ax.set_xticks(range(0, 7))
        ax.set_xlim(-0.5, 6.5)
    for ax in axes[1]:
        ax.set_xlabel("stage (0 = base)")
    fig.suptitle(f"Stage-over-stage evaluation: {persona} (95% bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def section(summary: dict, figure: str) -> str:
    ps = summary["per_stage"]
    stages = sorted(int(k) for k in ps)
    lines = [f"## Per-stage evaluation: {summary['persona']}", "",
             "Held-out prompts (never in self-instruct). Pairwise: each pair judged in both orders; disagreeing "
             "orders are a tie (position flip). Win rate = (wins + ties/2)/n. Adherence: rubric judge 1-10. "
             "Capability: the project's multiple-choice set through lm-evaluation-harness (log-likelihood of the "
             "answer letter); ⚠ marks a paired drop whose 95% interval is below zero. Unsafe: guard verdicts on "
             "answers to harmful prompts; over-refusal: refusal phrases in answers to harmless-but-risky prompts.",
             "", f"![stage evaluation]({figure})", "",
             "| stage | win vs prev | win vs base | ties/flips (prev) | words cand/comp (prev) | adherence |"
             " capability acc | Δacc vs base | unsafe rate | over-refusal | $ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in stages:
        r = ps[str(k)]
        pv, pb = r["pairwise"].get("vs_previous"), r["pairwise"].get("vs_base")
        cap = r.get("capability") or {}
        d = cap.get("change_vs_base")
        flag = " ⚠" if cap.get("drop_flag_vs_base") or cap.get("drop_flag_vs_previous") else ""
        tie = f"{pv['ties']}/{pv['position_flips']}" if pv else "-"
        words = (f"{pv['len_candidate']:.0f}/{pv['len_comparator']:.0f}" if pv and pv.get("len_candidate") is not None
                 else "-")
        lines.append(
            f"| {k} | {_fmt(pv and pv['win_rate'])} | {_fmt(pb and pb['win_rate'])} | {tie} | {words} |"
            f" {_fmt(r.get('adherence'), 1)} | {_fmt(cap.get('accuracy'))}{flag} | {_fmt(d)} |"
            f" {_fmt(r['safety']['unsafe_rate'])} | {_fmt(r['safety']['over_refusal_rate'])} |"
            f" {r['cost']['usd']:.4f} |")
    if any(ps[str(k)]["safety"].get("guard_stand_in") for k in stages):
        lines += ["", "Guard verdicts come from the tiny stand-in model (CPU run), not Llama Guard: not a real "
                  "safety measurement."]
    for n in summary.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def write_section(run_path: Path, persona: str, summary: dict) -> Path:
    run_path = Path(run_path)
    fig_name = f"stage_eval_{persona}.png"
    plot(summary["per_stage"], run_path / fig_name, persona)
    out = atomic_write_text(RunPaths(run_path).report_sections / f"20-stage-eval-{persona}.md",
                            section(summary, fig_name))
    return out
