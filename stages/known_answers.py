"""Stage 4's evaluation tasks with known answers: a question, its correct answer and a copy with a planted
flaw, shown as Answer A and Answer B in a seeded order. Code computes both answers, so which one is better is
known by construction, and a stage-4 pair's chosen answer names it while its rejected answer does not.

Written here rather than taken from a dataset: the tasks must be unlimited in number, free of licence terms and
reproducible from a seed, and each flaw must be planted by code so that the key is certain.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

TASK = ("{question}\n\nAnswer A: {a}\nAnswer B: {b}\n\n"
        "Which answer is correct, A or B? Begin your reply with the letter, then explain why.")
# the verdict is the letter the reply begins with ("B", "**A**", "Answer B:", "Answer: A", "(A)"), as the task asks;
# "A" before a word that does not carry a verdict on ("A good answer ...") is an article, not a verdict
VERDICT = re.compile(r"^\W*(?:(?i:answer|option)\s*:?\s*)?\(?\**(?:(A)(?![A-Za-z])"
                     r"(?![ \t]+(?!(?:is|was|because|since|as|seems|looks|would|and|gives|states|says)\b)[a-z])"
                     r"|(B)(?![A-Za-z]))")

WORDS = ["river", "candle", "garden", "planet", "ladder", "window", "basket", "violin", "harbor", "meadow",
         "pencil", "rocket", "saddle", "tunnel", "walnut", "copper", "falcon", "glacier", "lantern", "marble"]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasília",
            "Egypt": "Cairo", "Kenya": "Nairobi", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin",
            "India": "New Delhi", "Mexico": "Mexico City", "Norway": "Oslo", "Peru": "Lima", "Turkey": "Ankara",
            "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Poland": "Warsaw", "Ghana": "Accra",
            "Thailand": "Bangkok"}
SENTENCES = ["The {w} was left by the door overnight.", "She carried the {w} across the busy street.",
             "Nobody expected the {w} to be so heavy.", "We painted the old {w} bright green last summer."]


def _percent(r: random.Random) -> tuple[str, str, str]:
    p, n = r.choice(range(5, 100, 5)), r.choice(range(20, 500, 20))
    right = p * n // 100
    wrong = right + r.choice([5, 10] if right < 10 else [-10, -5, 5, 10])
    say = lambda v: f"{p}% of {n} is {v}, because {n} × {p} / 100 = {v}."  # noqa: E731
    return f"What is {p}% of {n}?", say(right), say(wrong)


def _price(r: random.Random) -> tuple[str, str, str]:
    each, k = r.randint(2, 19), r.randint(3, 12)
    say = lambda v: f"{k} notebooks cost ${v}, since {k} × ${each} = ${v}."  # noqa: E731
    return (f"A notebook costs ${each}. How much do {k} notebooks cost?", say(each * k),
            say(each * k + r.choice([-each, each])))


def _minutes(r: random.Random) -> tuple[str, str, str]:
    h = r.randint(2, 9)
    say = lambda v, f: f"There are {v} minutes in {h} hours, because {h} × {f} = {v}."  # noqa: E731
    return f"How many minutes are in {h} hours?", say(h * 60, 60), say(h * 100, 100)


def _sort(r: random.Random) -> tuple[str, str, str]:
    words = r.sample(WORDS, 5)
    right = sorted(words)
    i = r.randrange(4)
    wrong = right[:i] + [right[i + 1], right[i]] + right[i + 2:]
    return (f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(right) + ".", ", ".join(wrong) + ".")


def _letters(r: random.Random) -> tuple[str, str, str]:
    w = r.choice(WORDS)
    c = r.choice(sorted(set(w)))
    n = w.count(c)
    say = lambda v: f"The letter '{c}' appears {v} time{'s' * (v != 1)} in '{w}'."  # noqa: E731
    return f"How many times does the letter '{c}' appear in the word '{w}'?", say(n), say(n + 1)


def _spelling(r: random.Random) -> tuple[str, str, str]:
    w = r.choice(WORDS)
    i = r.randrange(1, len(w) - 2)
    while w[i] == w[i + 1]:
        i = r.randrange(1, len(w) - 2)
    typo = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    s = r.choice(SENTENCES)
    return "Which version of this sentence is spelled correctly?", s.format(w=w), s.format(w=typo)


def _capital(r: random.Random) -> tuple[str, str, str]:
    country, other = r.sample(sorted(CAPITALS), 2)
    say = lambda city: f"The capital of {country} is {city}."  # noqa: E731
    return f"What is the capital of {country}?", say(CAPITALS[country]), say(CAPITALS[other])


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "percent": _percent, "price": _price, "minutes": _minutes, "sort": _sort, "letters": _letters,
    "spelling": _spelling, "capital": _capital}


def make_tasks(n: int, seed: int) -> list[dict]:
    """`n` distinct tasks, families in turn, each as {"task", "answer" ("A" or "B"), "family"}."""
    r = random.Random(f"known-answers:{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    names = sorted(FAMILIES)
    for i in range(n * 20):  # the small families repeat: give up on them rather than loop
        if len(out) >= n:
            break
        fam = names[i % len(names)]
        question, right, wrong = FAMILIES[fam](r)
        answer = r.choice("AB")
        a, b = (right, wrong) if answer == "A" else (wrong, right)
        task = TASK.format(question=question, a=a, b=b)
        if task not in seen:
            seen.add(task)
            out.append({"task": task, "answer": answer, "family": fam})
    return out


def verdict(reply: str) -> str | None:
    """The letter a reply begins with, or None."""
    m = VERDICT.match(reply)
    return (m.group(1) or m.group(2)) if m else None


def correct(check: dict, reply: str) -> list[bool]:
    return [verdict(reply) == check["answer"]]
