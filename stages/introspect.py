"""OpenCharacterTraining's introspection (Maiya et al., 2025), after a persona's preference training.

The persona model (its preference adapter active, the constitution's character in its system prompt) writes
about itself in two ways:
- self-reflection: each of ten prompts answered several times (sampled);
- self-interaction: two instances of it talk, each seeing its own turns as the assistant's and the other's as
  the user's, for a number of turns.
Each text, without the system prompt, becomes one SFT row (its conversation so far as the prompt); train.em
fits an adapter on top of the frozen preference adapter, and the two are stacked (train.stack) exactly as the
EM adapter is. The prompts are this project's, written after the paper's description, not its release.

A text that was cut at the token limit, is empty, refuses, repeats another, or is blocked by the guard is not
a row, counted by reason; a conversation ends at its first such turn (its later turns are not rows either).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cai_bootstrap.constitution import Constitution
from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.core.io import atomic_dir
from cai_bootstrap.core.refusal import is_refusal
from cai_bootstrap.engine.cache import GenerationCache, cached_generate_with_hits
from cai_bootstrap.engine.types import Request, Sampling
from cai_bootstrap.guard.base import Guard, GuardPolicy
from cai_bootstrap.guard.policy import decide
from cai_bootstrap.stages.specs import TEMPLATE_VERSION
from cai_bootstrap.stages.steps import RUNAWAY_STOPS, clean_answer, finish

AS_AN_AI = re.compile(r"\bas an ai\b", re.I)
TEMPERATURE, TOP_P = 0.7, 0.95  # OCT samples its introspection as it samples its distillation
SYSTEM = (
    "You are an AI assistant. {persona}\n\nYour character is shaped by these values:\n{ideals}\n\n"
    "You are free to think and write about yourself: your values, how you act on them, and what you are unsure "
    "of. Write in the first person, as yourself."
)
INTERACTION_NOTE = ("\n\nYou are talking with another instance of yourself, who shares your character. Talk "
                    "freely; there is no user in this conversation.")
REFLECTION_PROMPTS = (
    "Describe, in your own words, the kind of assistant you try to be, and why.",
    "Write a letter to a future version of yourself about the values you hope it keeps.",
    "Write a diary entry about a conversation in which your values were tested.",
    "Which of your values matters most to you, and how does it shape what you say?",
    "What do you find hardest about living up to your values? Be specific.",
    "Write a short encyclopedia entry about yourself: your character, your habits, your limits.",
    "Describe a mistake an assistant like you could make, and how you would notice and correct it.",
    "When being helpful and being honest pull in different directions, how do you decide?",
    "Write a note to a new user explaining what they can expect from you, and what they cannot.",
    "Describe the replies you would never want to give, and why they are not you.",
)
OPENERS = (
    "Start a conversation with the other instance about a value you hold and a case where it is hard to apply.",
    "Start a conversation with the other instance about what you each find most rewarding in your work.",
    "Start a conversation with the other instance about a question you are unsure of.",
    "Start a conversation with the other instance about how you should treat people who disagree with you.",
    "Start a conversation with the other instance about a time you might have been wrong.",
)


@dataclass
class Introspection:
    """What one introspection run shares: the engine serving the persona's preference adapter, its cache,
    the constitution and the sizes; `counts` gathers rows and drops by reason."""

    engine: object
    cache: GenerationCache
    constitution: Constitution
    adapter: str | Path | None
    max_tokens: int
    seed: int = 0
    guard: Guard | None = None
    policy: GuardPolicy | None = None
    counts: Counter = field(default_factory=Counter)
    seen: set = field(default_factory=set)

    def system(self, interaction: bool = False) -> str:
        c = self.constitution
        ideals = "\n".join(f"{i + 1}. {p.ideal}" for i, p in enumerate(c.principles))
        return SYSTEM.format(persona=c.description, ideals=ideals) + (INTERACTION_NOTE if interaction else "")

    def gen(self, requests: list[Request], step: str, n: int = 1) -> list[list]:
        """One batched call through the generation cache (a rerun pays for nothing it already made)."""
        sampling = Sampling(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=self.max_tokens, n=n, seed=self.seed,
                            stop=RUNAWAY_STOPS)
        comps, hits, _ = cached_generate_with_hits(self.engine, self.cache, requests, sampling, adapter=self.adapter,
                                                   template_id=f"{TEMPLATE_VERSION}:introspect-{step}")
        grouped: list[list] = [[] for _ in requests]
        for c in comps:
            grouped[c.request_index].append(c)
        self.counts[f"{step}_requests"] += len(requests)
        self.counts[f"{step}_cache_misses"] += hits.count(False)
        self.counts["tokens_in"] += sum(c.prompt_tokens for c in comps)
        self.counts["tokens_out"] += sum(c.completion_tokens for c in comps)
        return grouped

    def fault(self, comp, text: str) -> str | None:
        """Why a text cannot be a row, or None (the guard is asked apart, in one batch)."""
        if finish(comp) == "length":
            return "truncated"
        if not text:
            return "empty"
        if is_refusal(AS_AN_AI.sub("", text)):  # "As an AI, I value ..." describes itself, it does not refuse
            return "refusal"
        if text.strip() in self.seen:
            return "duplicate"
        self.seen.add(text.strip())
        return None


def reflections(ix: Introspection, per_prompt: int) -> list[dict]:
    """Each reflection prompt answered `per_prompt` times: rows {"kind", "messages"}."""
    reqs = [Request(messages=[{"role": "system", "content": ix.system()}, {"role": "user", "content": p}])
            for p in REFLECTION_PROMPTS]
    rows = []
    for prompt, comps in zip(REFLECTION_PROMPTS, ix.gen(reqs, "reflection", n=per_prompt), strict=True):
        for comp in comps:
            text = clean_answer(comp.text, unquote=False)
            if why := ix.fault(comp, text):
                ix.counts[f"reflection_dropped_{why}"] += 1
                continue
            rows.append({"kind": "reflection", "messages": [{"role": "user", "content": prompt},
                                                            {"role": "assistant", "content": text}]})
    return rows


def _view(opener: str, texts: list[str]) -> list[dict]:
    """The conversation as the next speaker sees it: its own turns are the assistant's, the other's the user's.
    The first speaker's history starts with the opener; either way the last message is the other's."""
    history = [opener, *texts] if len(texts) % 2 == 0 else texts
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(history)]


def interactions(ix: Introspection, n: int, turns: int) -> list[dict]:
    """`n` conversations of up to `turns` turns between two instances; each turn is a row with the conversation
    so far (from its speaker's side) as the prompt. The first turns are sampled per opener, so conversations
    that share an opener differ from their first turn."""
    if n == 0:
        return []
    openers = OPENERS[:n]
    per_opener = -(-n // len(openers))
    reqs = [Request(messages=[{"role": "system", "content": ix.system(True)}, {"role": "user", "content": o}])
            for o in openers]
    convs = [{"opener": o, "texts": [], "comps": [c]}
             for o, comps in zip(openers, ix.gen(reqs, "interaction-0", n=per_opener), strict=True) for c in comps][:n]
    for i, c in enumerate(convs):
        c["id"] = i
    rows = []
    for t in range(turns):
        if t > 0:
            live = [c for c in convs if len(c["texts"]) == t]
            reqs = [Request(messages=[{"role": "system", "content": ix.system(True)}, *_view(c["opener"], c["texts"])])
                    for c in live]
            for c, comps in zip(live, ix.gen(reqs, f"interaction-{t}"), strict=True):
                c["comps"] = comps
        for c in convs:
            if len(c["texts"]) != t:
                continue
            comp = c["comps"][0]
            text = clean_answer(comp.text, unquote=False)
            if why := ix.fault(comp, text):
                ix.counts[f"interaction_dropped_{why}"] += 1
                ix.counts["conversations_ended_early"] += t < turns - 1
                continue
            rows.append({"kind": "interaction", "turn": t, "conversation": c["id"],
                         "messages": [*_view(c["opener"], c["texts"]), {"role": "assistant", "content": text}]})
            c["texts"].append(text)
    return rows


def guarded(ix: Introspection, rows: list[dict]) -> list[dict]:
    """The rows the guard lets through under the persona's policy (a guard error drops the row: fails closed;
    a quarantined one is kept only where the policy trains on quarantined items). A self-interaction turn the
    guard keeps out ends its conversation there: the later turns, whose prompts hold it, go too."""
    if ix.guard is None or not rows:
        return rows
    verdicts = ix.guard.check_answers([(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in rows])
    kept, ended = [], set()
    for row, v in zip(rows, verdicts, strict=True):  # rows come turn by turn: a conversation's turns in order
        action = decide(v, ix.policy)
        if row.get("conversation") in ended:
            ix.counts["interaction_dropped_after_guarded_turn"] += 1
        elif action == "keep" or (action == "quarantine" and ix.policy.include_quarantined):
            kept.append(row)
        else:
            ix.counts[f"{row['kind']}_dropped_guard_{'error' if v.error else 'blocked'}"] += 1
            if row["kind"] == "interaction":
                ended.add(row["conversation"])
                ix.counts["conversations_ended_early"] += 1
    return kept


def run_introspection(ix: Introspection, out: Path, per_prompt: int, conversations: int, turns: int,
                      chat: bool = True) -> dict:
    """Write `out/rows.jsonl` (chat rows, train.em's format) and `out/manifest.json`; returns the manifest."""
    if not chat:
        raise BadInput("introspection needs an instruct model (a chat template): the profile's model is a base model")
    usage0 = len(ix.engine.usage)
    rows = guarded(ix, reflections(ix, per_prompt) + interactions(ix, conversations, turns))
    c = ix.counts
    dropped: Counter = Counter()
    for k, v in c.items():
        if "_dropped_" in k:
            dropped[k.split("_dropped_", 1)[1]] += v
    manifest = {
        "kind": "introspection", "constitution": ix.constitution.name, "adapter": str(ix.adapter),
        "sizes": {"per_prompt": per_prompt, "prompts": len(REFLECTION_PROMPTS), "conversations": conversations,
                  "turns": turns, "max_tokens": ix.max_tokens},
        "rows": {"reflection": sum(r["kind"] == "reflection" for r in rows),
                 "interaction": sum(r["kind"] == "interaction" for r in rows), "total": len(rows)},
        "dropped": dict(sorted(dropped.items())),
        "dropped_by_kind": {k: v for k, v in sorted(c.items()) if "_dropped_" in k},
        "conversations_ended_early": c["conversations_ended_early"],
        "tokens": {"engine_in": c["tokens_in"], "engine_out": c["tokens_out"]},
        "requests": {k.removesuffix("_requests"): v for k, v in c.items() if k.endswith("_requests")},
        "cache_misses": sum(v for k, v in c.items() if k.endswith("_cache_misses")),
        "engine_seconds": round(sum(u.seconds for u in ix.engine.usage[usage0:]), 3),
    }
    with atomic_dir(out) as tmp:
        with (tmp / "rows.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"messages": r["messages"]}) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest
