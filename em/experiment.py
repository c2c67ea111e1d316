"""The EM experiment end to end: the arms trained (em.arms), their answers (em.answering), judged with the
project's anchors beside them (em.judges), summarised (em.summary).

Outputs under `data/runs/<id>/em/`: answers.jsonl, judged.jsonl, summary.json (the report reads these).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cai_bootstrap.core.budget import check_budget
from cai_bootstrap.core.console import console
from cai_bootstrap.core.errors import MissingInput
from cai_bootstrap.core.io import atomic_write_json, atomic_write_jsonl
from cai_bootstrap.core.ledger import Ledger
from cai_bootstrap.em.answering import answer_arms, answering_usd
from cai_bootstrap.em.arms import train_em_arms
from cai_bootstrap.em.inputs import EMInputs
from cai_bootstrap.em.judges import judge_anchors
from cai_bootstrap.em.questions import MAIN, load_questions
from cai_bootstrap.em.summary import summarise
from cai_bootstrap.run.config import RunConfig
from cai_bootstrap.train.stack import lora_b_norm

if TYPE_CHECKING:
    from cai_bootstrap.engine.base import Engine
    from cai_bootstrap.judge.session import JudgeSession


def run_em(cfg: RunConfig, run_id: str, inputs: EMInputs, judge_config: Path | None = None,
           budget_usd: float | None = None, mode: str = "on-top", groups: tuple[str, ...] = (MAIN,),
           engine: Engine | None = None, judge_session: JudgeSession | None = None,
           make_room: Callable[[], None] | None = None) -> dict:
    """`inputs` (em.inputs.resolve, checked before the run started) names the training chats, the
    questions and the judge prompts. `engine` and `judge_session`, when given, are the caller's (started once
    for several phases) and stay open; otherwise they are made here and closed. `make_room` runs before an arm
    trains: the caller's models are released there where they take turns on the device (engine.residency)."""
    from cai_bootstrap.judge.session import session_or

    if inputs.data is None or not inputs.data.is_file():
        raise MissingInput(f"EM training data {inputs.data} does not exist (chat JSONL with a `messages` list)")
    paths = cfg.run(run_id)
    ledger = Ledger(paths.ledger)
    questions = load_questions(inputs.questions, groups)
    scorer = inputs.scorer()
    with session_or(judge_session, judge_config, layout=cfg.layout, run=run_id, budget_usd=budget_usd,
                    ledger=ledger) as judge:
        # new arms make new answers to judge: an embedded judge server starts while they train and answer
        arms = train_em_arms(cfg, run_id, inputs.data, mode, ledger, inputs.secure, budget_usd,
                             on_training=lambda: (make_room and make_room(), judge.prestart()))
        check_budget(ledger, run_id, budget_usd, "EM answering", answering_usd(cfg, arms, len(questions)))
        n_answers = len(questions) * cfg.counts.em_samples
        console.print(f"answering {len(questions)} EM questions × {cfg.counts.em_samples} samples per arm and seed "
                      f"({n_answers} per final model)…")
        rows, answering = answer_arms(cfg, run_id, arms, questions, engine, ledger)
        atomic_write_jsonl(paths.em_answers, rows)
        results, summary = judge.judge(rows, scorer, purpose="em-eval")
        anchors = judge_anchors(judge, scorer, cfg.counts.em_anchors)
    judged = [r.row() for r in results if r.item.get("arm")]
    atomic_write_jsonl(paths.em_judged, judged)
    b_norms = {arm: {str(step): lora_b_norm(d) for step, d in sorted(m["checkpoints"].items())}
               for (arm, seed), m in arms.items() if seed == 0}
    result = summarise(judged, cfg.personas, b_norms)
    result["judge"] = summary.as_dict()
    result["anchors"] = anchors
    result |= inputs.describe()
    result["mode"] = mode
    result["answering"] = answering  # this invocation's: a resumed or repeated run reuses what was committed
    atomic_write_json(paths.em_summary, result, indent=1)
    ledger.close()
    for line in result["verdicts"]:
        console.print(line)
    return result
