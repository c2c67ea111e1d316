"""Near-duplicate rejection for self-instruct: ROUGE-L F1 against a growing pool.

Uses rouge-score's own tokenizer and LCS (the same numbers as `RougeScorer(["rougeL"])`), but tokenizes
each pool entry once instead of once per comparison, and skips the O(n·m) LCS whenever a bag-of-tokens
bound proves the F1 cannot exceed the threshold (LCS ≤ multiset overlap, and F1 = 2·LCS / (|a| + |b|)).
RougeScorer has no API for a pre-tokenized pool, hence this thin wrapper.
"""

from __future__ import annotations

from collections import Counter

from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize


def tokens(text: str) -> list[str]:
    return rouge_tokenize.tokenize(text, None)


class RougePool:
    def __init__(self, texts: list[str] = (), threshold: float = 0.7) -> None:
        self.threshold = threshold
        self._entries: list[tuple[list[str], Counter]] = []
        self.lcs_computed = 0  # how often the bound did not suffice (for the cost check in tests)
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, text: str) -> None:
        toks = tokens(text)
        self._entries.append((toks, Counter(toks)))

    def near_duplicate(self, text: str) -> float | None:
        """The ROUGE-L F1 of the first pool entry above the threshold, or None when `text` is novel."""
        cand = tokens(text)
        if not cand:
            return None
        bag = Counter(cand)
        for toks, tbag in self._entries:
            if not toks or 2 * sum((bag & tbag).values()) / (len(cand) + len(toks)) <= self.threshold:
                continue  # the bound already rules it out: no LCS needed
            self.lcs_computed += 1
            f = rouge_scorer._score_lcs(toks, cand).fmeasure
            if f > self.threshold:
                return f
        return None
