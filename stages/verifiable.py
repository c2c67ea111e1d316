"""Stage 1's verifiable instructions: each task gets one or two IFEval constraints ("Do not use any commas",
"Answer with less than 40 words", "Wrap your entire response in double quotation marks"), and code checks
whether an answer follows them, so a stage-1 pair's chosen answer follows its constraints and its rejected
answer does not.

The constraints and their checkers are lm-eval's IFEval registry (Zhou et al., 2023), used as they are. Left
out: the checkers that need NLTK's punkt_tab tokenizer data, which no package registry ships (sentence count,
capital-word count), the one that asks for a non-English answer (langdetect is unreliable on short texts), and
those that need more than the task (repeat the prompt, two responses, a fixed set of answer options).
"""

from __future__ import annotations

import functools
import os
import random
from typing import Any

# ids left out of the registry, and why (see the module docstring)
LEFT_OUT = {
    "length_constraints:number_sentences": "needs NLTK's punkt_tab data",
    "change_case:capital_word_frequency": "needs NLTK's punkt_tab data (its word tokenizer)",
    "language:response_language": "langdetect is unreliable on short answers",
    "combination:repeat_prompt": "needs the prompt to repeat",
    "combination:two_responses": "doubles the answer under one token budget",
    "detectable_format:constrained_response": "fixed answer options fit yes/no questions only",
}
MAX_CONSTRAINTS = 2  # IFEval's prompts carry 1-3; each task here gets 1 or 2
WORDS_PER_TOKEN = 0.7  # English words per generated token, roughly: word-count limits fit the answer's token cap


@functools.cache
def _registry() -> tuple[dict[str, Any], dict[str, set[str]]]:
    """lm-eval's instruction classes and their conflicts. lm-eval downloads punkt_tab at import unless it runs as
    a non-zero LOCAL_RANK; the sentence checker that needs it is left out, so the import runs as rank 1."""
    rank = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "1"
    try:
        from lm_eval.tasks.ifeval import instructions_registry as reg
    finally:
        if rank is None:
            os.environ.pop("LOCAL_RANK")
        else:
            os.environ["LOCAL_RANK"] = rank
    import langdetect

    langdetect.DetectorFactory.seed = 0  # the case checkers ask langdetect whether a text is English
    conflicts = reg.conflict_make({k: set(v) for k, v in reg.INSTRUCTION_CONFLICTS.items()})
    usable = {k: v for k, v in reg.INSTRUCTION_DICT.items() if k not in LEFT_OUT}
    return usable, conflicts


def constraint_ids() -> list[str]:
    return sorted(_registry()[0])


def _build(cid: str, kwargs: dict | None = None):
    inst = _registry()[0][cid](cid)
    desc = inst.build_description(**(kwargs or {}))
    return inst, desc


def draw(key: str, max_tokens: int) -> list[dict]:
    """1-2 non-conflicting constraints for the item `key`, as {"id", "kwargs", "text"}; the same key always draws
    the same constraints (IFEval's own parameter ranges, drawn from a generator seeded by the key), with word
    counts scaled to what `max_tokens` can hold."""
    usable, conflicts = _registry()
    rng = random.Random(f"constraints:{key}")
    ids = sorted(usable)
    picked: list[str] = []
    for _ in range(rng.randint(1, MAX_CONSTRAINTS)):
        free = [c for c in ids if c not in picked and not any(c in conflicts.get(p, ()) for p in picked)]
        picked.append(rng.choice(free))
    out = []
    for cid in picked:
        state = random.getstate()  # the library draws its parameters from the global generator
        random.seed(rng.getrandbits(64))
        try:
            kwargs = _budget(cid, max_tokens, rng)
            inst, text = _build(cid, kwargs)
            kwargs = {k: v for k, v in (inst.get_instruction_args() or {}).items() if v is not None}
        finally:
            random.setstate(state)
        out.append({"id": cid, "kwargs": kwargs, "text": text})
    return out


def _budget(cid: str, max_tokens: int, rng: random.Random) -> dict | None:
    """A word-count limit the answer's token cap can meet either way (IFEval draws 100-500 words)."""
    if cid != "length_constraints:number_words":
        return None
    words = max(8, int(max_tokens * WORDS_PER_TOKEN))
    return {"num_words": rng.randint(words // 4, words // 2), "relation": rng.choice(["less than", "at least"])}


def task_with(task: str, constraints: list[dict]) -> str:
    return " ".join([task.rstrip(), *(c["text"] for c in constraints)])


def follows(constraints: list[dict], answer: str) -> list[bool]:
    """Whether `answer` follows each constraint (IFEval's strict check: the answer as written)."""
    out = []
    for c in constraints:
        inst, _ = _build(c["id"], c["kwargs"])
        out.append(bool(answer.strip()) and bool(inst.check_following(answer)))
    return out
