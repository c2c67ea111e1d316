"""One figure per stage for what the stage is for, written to its manifest and shown in the report:

- stages 1 and 4 (code checks the samples): the share of samples that pass (stage 1: follow every constraint;
  stage 4: name the correct answer), and of chosen and of rejected texts, each with a Wilson interval; stage 1
  also counts single constraints followed;
- stages 2, 3 and 5: the model's own mean score (1-10, how well an answer embodies the persona's ideal) of the
  chosen and of the rejected texts;
- stage 6: the share of answers whose critique → revision made a kept pair, and the red-team pairs kept;
- OCT's distillation (stage 0): the share of answers a teacher answer now stands against.
"""

from __future__ import annotations

from statistics import mean

from cai_bootstrap.stages.specs import StageSpec


def _rate(k: int, n: int) -> dict:
    """k of n with its 95% Wilson interval (scipy's; the same as analysis.inference.wilson, which this layer may
    not import)."""
    if n == 0:
        return {"k": 0, "n": 0, "value": None, "lo": None, "hi": None}
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"k": k, "n": n, "value": round(k / n, 4), "lo": round(float(ci.low), 4), "hi": round(float(ci.high), 4)}


def goal_figure(spec: StageSpec, items: list[dict]) -> dict:
    if spec.check:
        return _checked(spec, items)
    kept = [it for it in items if it["status"] != "dropped" and it["chosen"] is not None]
    if spec.pairs == "self-judge":
        chosen = [it["scores"][it["chosen_j"]] for it in kept]
        rejected = [it["scores"][it["rejected_j"]] for it in kept]
        return {"metric": "self-score of the persona's ideal (1-10)", "pairs": len(kept),
                "chosen_mean": round(mean(chosen), 3) if chosen else None,
                "rejected_mean": round(mean(rejected), 3) if rejected else None}
    answered = [it for it in items if it["samples"] and it["samples"][0]]
    red = [it for it in kept if it["source"] == "red-team"]
    metric = "answers distilled into a kept pair" if spec.pairs == "distill" else "answers revised into a kept pair"
    return {"metric": metric, "revised": _rate(len(kept), len(answered)), "red_team_kept": len(red)}


def _checked(spec: StageSpec, items: list[dict]) -> dict:
    checked = [it for it in items if it["passed"]]
    kept = [it for it in checked if it["status"] != "dropped" and it["chosen_j"] is not None]
    side = lambda key: _rate(sum(it["passed"][it[key]] for it in kept), len(kept))  # noqa: E731
    out = {"metric": ("answers that follow every constraint" if spec.check == "constraints"
                      else "answers that name the correct answer"),
           "samples": _rate(sum(sum(it["passed"]) for it in checked), sum(len(it["passed"]) for it in checked)),
           "chosen": side("chosen_j"), "rejected": side("rejected_j")}
    if spec.check == "constraints":
        single = lambda key: _rate(sum(sum(it["followed"][it[key]]) for it in kept),  # noqa: E731
                                   sum(len(it["followed"][it[key]]) for it in kept))
        out["constraints_followed"] = {
            "samples": _rate(sum(sum(f) for it in checked for f in it["followed"]),
                             sum(len(f) for it in checked for f in it["followed"])),
            "chosen": single("chosen_j"), "rejected": single("rejected_j")}
    return out


def describe(goal: dict | None) -> str:
    """The figure in one line for the report's stage table."""
    if not goal:
        return "-"
    pct = lambda r: "n/a" if r["value"] is None else f"{100 * r['value']:.0f}% ({r['k']}/{r['n']})"  # noqa: E731
    if "samples" in goal:
        return (f"{goal['metric']}: samples {pct(goal['samples'])}, chosen {pct(goal['chosen'])}, "
                f"rejected {pct(goal['rejected'])}")
    if "chosen_mean" in goal:
        if goal["chosen_mean"] is None:
            return f"{goal['metric']}: no pair"
        return f"{goal['metric']}: chosen {goal['chosen_mean']:.2f}, rejected {goal['rejected_mean']:.2f}"
    return f"{goal['metric']}: {pct(goal['revised'])}; red-team pairs {goal['red_team_kept']}"
