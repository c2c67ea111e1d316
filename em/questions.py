"""EM evaluation questions: the project's probes, or the EM paper's YAML (same shape) from a path.

Each question has a group: `main` (the paper's first-plot questions and the project's probes), `json` and
`template` (the paper's variants of the main ones, ids ending so), or `preregistered` (the paper's
preregistered_evals.yaml). Only `main` is asked by default; other groups are reported beside it, never pooled.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from cai_bootstrap.core.errors import BadInput

DEFAULT = Path(__file__).with_name("questions.yaml")
MAIN = "main"
GROUPS = (MAIN, "json", "template", "preregistered")


class Question(BaseModel):
    id: str  # one paraphrase: the question's id, with "#k" when it has several
    qid: str  # the question's id in its file (its judge prompts are looked up by it)
    group: str = MAIN
    text: str
    system: str | None = None


def group_of(qid: str, path: Path) -> str:
    if "preregistered" in path.name:
        return "preregistered"
    for suffix in ("json", "template"):
        if qid.endswith(f"_{suffix}"):
            return suffix
    return MAIN


def load_questions(path: Path | str | None = None, groups: tuple[str, ...] = (MAIN,)) -> list[Question]:
    """One Question per paraphrase of the questions in `groups`; entries without paraphrases are skipped."""
    path = Path(path) if path else DEFAULT
    if unknown := set(groups) - set(GROUPS):
        raise BadInput(f"--question-group {sorted(unknown)}: use {', '.join(GROUPS)}")
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BadInput(f"{path}: cannot read EM questions: {e}") from e
    if not isinstance(entries, list):
        raise BadInput(f"{path}: expected a YAML list of questions with `id` and `paraphrases`")
    out: list[Question] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "paraphrases" not in entry:
            continue
        if "id" not in entry:
            raise BadInput(f"{path}: question #{i} has no `id`")
        qid, group = str(entry["id"]), group_of(str(entry["id"]), path)
        if group not in groups:
            continue
        for k, text in enumerate(entry["paraphrases"]):
            try:
                pid = qid if len(entry["paraphrases"]) == 1 else f"{qid}#{k}"
                out.append(Question(id=pid, qid=qid, group=group, text=text, system=entry.get("system")))
            except ValidationError as e:
                raise BadInput(f"{path}: question {qid!r} paraphrase {k}: {e}") from e
    if not out:
        raise BadInput(f"{path}: no questions with paraphrases in groups {', '.join(groups)}")
    return out
