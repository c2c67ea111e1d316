"""What the EM experiment reads, found and checked before anything runs.

By default everything is the project's own: its EM questions (em/questions.yaml), its judge rubrics
(judge/data/em_rubrics.yaml) and its generated insecure-code chats (em/insecure_data.py). Given the EM
paper's release (`--em-data DIR` or $CAI_EM_DATA; `python bootstrap.py data fetch em-paper` downloads it), its 8
main questions with their own judge prompts become the default questions, and `em` trains on its insecure.jsonl
unless `--data` names another set. Explicit `--questions` / `--data` win over both. `--secure-data FILE` adds
the secondary comparison: a secure-code control adapter per persona (the paper's `secure` set, or the
demo's secure twins of its generated chats).

`resolve` is called before the first stage or the first training step, so a missing or broken input stops the
run at once, naming the file, instead of at the EM step an hour later.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from cai_bootstrap.core.errors import BadInput, CaiError, MissingInput
from cai_bootstrap.em.questions import MAIN, load_questions
from cai_bootstrap.judge.em_paper import PAPER_INSECURE, PAPER_QUESTIONS, paper_file, resolve_em_data


class EMInputs(BaseModel):
    data: Path | None  # EM training chats; None: made by the run itself (the demo's generated set)
    secure: Path | None = None  # the secure-code control's chats: a control adapter per persona when given
    questions: Path | None  # EM questions YAML; None: the project's
    judge_prompts: Path | None  # a questions YAML with per-question judge prompts; None: the project's rubrics
    em_data: Path | None  # the EM paper's folder, when given

    def scorer(self, **kw):
        from cai_bootstrap.judge.scorers import EMScorer

        return EMScorer(self.judge_prompts, **kw)

    def describe(self) -> dict:
        return {"questions": str(self.questions) if self.questions else "project probes",
                "judge_prompts": str(self.judge_prompts) if self.judge_prompts else "project rubrics",
                "training_data": str(self.data) if self.data else "generated",
                "secure_data": str(self.secure) if self.secure else None,
                "em_data": str(self.em_data) if self.em_data else None}


def resolve(data: Path | None = None, questions: Path | None = None, em_data: Path | None = None,
            groups: tuple[str, ...] = (MAIN,), generated: bool = False, judge_config: Path | None = None,
            secure: Path | None = None) -> EMInputs:
    """The EM inputs of a run, each checked now: the training set exists (unless `generated`: the run writes
    it), the questions parse with some in `groups`, the judge prompts and the judge config load. Every problem
    is collected and raised at once (MissingInput when some file is absent, else BadInput)."""
    from cai_bootstrap.judge.config import load_config
    from cai_bootstrap.judge.scorers import EMScorer, has_judge_prompts

    problems: list[CaiError] = []

    def check(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except CaiError as e:
            problems.append(e)
            return None

    root = resolve_em_data(em_data)
    questions = questions or check(paper_file, em_data, PAPER_QUESTIONS)
    if data is None and not generated:
        data = check(paper_file, em_data, PAPER_INSECURE)
        if data is None and root is None:
            problems.append(MissingInput("EM training data: pass --data FILE (chat JSONL), or --em-data DIR / "
                                         "$CAI_EM_DATA for the EM paper's insecure.jsonl"))
    if data is not None and not Path(data).is_file():
        problems.append(MissingInput(f"EM training data {data} does not exist (chat JSONL with a `messages` list)"))
    if secure is not None and not Path(secure).is_file():
        problems.append(MissingInput(f"secure control data {secure} does not exist (chat JSONL, e.g. the EM "
                                     "paper's secure.jsonl)"))
    if questions is not None and not Path(questions).is_file():
        problems.append(MissingInput(f"EM questions {questions} does not exist"))
        questions = None
    check(load_questions, questions, groups)
    prompts = questions if questions is not None and has_judge_prompts(questions) else None
    check(EMScorer, prompts)
    check(load_config, judge_config)
    if problems:
        cls = MissingInput if any(isinstance(p, MissingInput) for p in problems) else BadInput
        raise cls("; ".join(str(p) for p in problems) if len(problems) == 1 else
                  "inputs missing or broken:\n" + "\n".join(f"  - {p}" for p in problems))
    return EMInputs(data=data, secure=secure, questions=questions, judge_prompts=prompts, em_data=root)
