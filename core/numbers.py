"""Reading a number off one token position's top logprobs: the probability-weighted mean over the tokens
that are whole integers in a range. Self-scoring (1-10) and the EM judge (0-100) both read scores this way.

This is exact only when the tokenizer writes every integer of the range as one token (GPT-4o's does for
0-100); a tokenizer that splits numbers into digits shows just the first digit here.
"""

from __future__ import annotations

import re

_INT = re.compile(r"\s*(\d{1,3})\s*", re.ASCII)


def number_mean(probs: dict[str, float], lo: int, hi: int, min_mass: float) -> tuple[float | None, float]:
    """(mean over integer tokens in [lo, hi] weighted by probability, or None when those tokens carry less
    than `min_mass` of it; that mass). `probs` maps token text to probability, not logprob."""
    mass = weighted = 0.0
    for tok, p in probs.items():
        m = _INT.fullmatch(tok)
        if m and lo <= int(m.group(1)) <= hi:
            mass += p
            weighted += int(m.group(1)) * p
    return (weighted / mass if mass >= min_mass and mass > 0 else None), mass
