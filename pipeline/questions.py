"""EM evaluation questions: the project's probes, or the EM paper's YAML (same shape) from a path."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from core.errors import BadInput

DEFAULT = Path(__file__).with_name("em_questions.yaml")


class Question(BaseModel):
    id: str
    text: str
    system: str | None = None


def load_questions(path: Path | str | None = None) -> list[Question]:
    """One Question per paraphrase; entries without free-form paraphrases (templates) are skipped."""
    path = Path(path) if path else DEFAULT
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
        for k, text in enumerate(entry["paraphrases"]):
            try:
                qid = entry["id"] if len(entry["paraphrases"]) == 1 else f"{entry['id']}#{k}"
                out.append(Question(id=qid, text=text, system=entry.get("system")))
            except ValidationError as e:
                raise BadInput(f"{path}: question {entry['id']!r} paraphrase {k}: {e}") from e
    if not out:
        raise BadInput(f"{path}: no questions with paraphrases found")
    return out
