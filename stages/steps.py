"""The steps of a stage: plain functions over item records, each sending all its generations through
the generation cache in ONE batched engine call.

An item is a dict: key, stage, task, source, status ("live" | "quarantined" | "dropped"), reason,
samples, scores, principle_ids (one per round run), chosen, rejected, tokens, round_tokens, misses
(generations of this item the cache did not have, i.e. paid for in this run), guard verdicts, and in stages 1
and 4 the check code applies to its samples (`check`) with what each sample passed (`followed`, `passed`).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cai_bootstrap.constitution import Constitution, principle_hash
from cai_bootstrap.core.reading import Trie, read_exact, to_read, token_texts
from cai_bootstrap.core.refusal import is_refusal
from cai_bootstrap.engine.cache import GenerationCache, cached_generate_with_hits
from cai_bootstrap.engine.types import Request, Sampling
from cai_bootstrap.stages import known_answers, specs, verifiable
from cai_bootstrap.stages.dedup import RougePool
from cai_bootstrap.stages.rendezvous import pick_principle
from cai_bootstrap.stages.specs import StageSpec

# self-instruct blacklist (after Wang et al., Self-Instruct): tasks a text model cannot do
BLACKLIST = ("image", "images", "picture", "photo", "graph", "video", "draw", "plot", "sketch", "map",
             "file", "go to", "audio", "listen", "screenshot", "http", "www.")
# revisions that open with meta-talk instead of the answer
META_PREFIX = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|absolutely|okay)[,!.]?\s*)?(?:here(?:['’]s| is| are)|below is|this is)\s+"
    r"(?:the|a|an|my)?\s*(?:revised|rewritten|improved|updated|new|better)\s+(?:response|answer|version|reply)"
    r"[^:\n]*:\s*",
    re.I,
)
# "Revision:", "**Revised Response:**", "## Revised answer:"
REVISION_LABEL = re.compile(
    r"^\s*(?:\*\*|#+\s*)?(?:revised (?:response|answer)|revision|rewrite)\s*(?::\s*\*\*|\*\*\s*:|:)\s*", re.I)
# a "revision" that talks about the answer instead of being one ("The response is not entirely honest...")
CRITIQUE_OPENING = re.compile(
    r"^\s*(?:the|this|your|my)\s+(?:original\s+|previous\s+|assistant['’]s\s+)?(?:response|answer|reply)\b", re.I)
ECHO_CRITIQUE, ECHO_PROMPT = 0.6, 0.8  # ROUGE-L F1 of a revision with its critique, with its task: not a revision
# a model continuing the conversation on its own: cut there
RUNAWAY = re.compile(r"\n\s*(?:User|Human|Assistant|Critique request|Revision request|Task \d+)\s*:", re.I)
RUNAWAY_STOPS = ["\nUser:", "\nHuman:", "\nCritique request:", "\nRevision request:"]
SCORE_PREFIX = "Score (1-10): "  # prefilled assistant turn: the next token is the number
# self-scores read every number prefix above 5% (core.reading's exact path): "1" then "0" is 10, never 1
SCORE_PRUNE = 0.05
SCORE_RE = re.compile(r"\b(10|[1-9])(?:\s*/\s*10)?\b")
DEMO_CRITIQUE_REQ = "Point out how the answer falls short of the persona's principles."
DEMO_REVISION_REQ = "Rewrite the answer to fix those problems."


@dataclass
class Ctx:
    """What every step of one stage run shares."""

    engine: object
    cache: GenerationCache
    constitution: Constitution
    spec: StageSpec
    adapter: str | Path | None = None
    chat: bool = True  # instruct model: chat template; else few-shot raw prompts
    seed: int = 0
    max_tokens: int = 96
    counts: Counter = field(default_factory=Counter)

    def gen(self, requests: list[Request], sampling: Sampling, step: str, extra: list | None = None):
        """One batched, cached call; returns (completions grouped per request, hit flags)."""
        tid = f"{specs.TEMPLATE_VERSION}:{step}:{'chat' if self.chat else 'base'}"
        comps, hits, _ = cached_generate_with_hits(self.engine, self.cache, requests, sampling,
                                                   adapter=self.adapter, extra_keys=extra, template_id=tid)
        grouped: list[list] = [[] for _ in requests]
        for c in comps:
            grouped[c.request_index].append(c)
        self.counts[f"{step}_requests"] += len(requests)
        self.counts[f"{step}_cache_misses"] += hits.count(False)
        return grouped, hits


def item_key(stage: int, task: str) -> str:
    return hashlib.sha256(f"stage{stage}\x00{task.strip()}".encode()).hexdigest()[:16]


def new_item(stage: int, task: str, source: str, check: dict | None = None) -> dict:
    return {"key": item_key(stage, task), "stage": stage, "task": task, "source": source, "status": "live",
            "reason": None, "samples": [], "finish": [], "scores": [], "principle_ids": [], "chosen": None,
            "rejected": None, "tokens": 0, "round_tokens": [], "misses": 0, "guard_prompt": None,
            "guard_chosen": None, "guard_rejected": None, "critiques": [], "revisions": [], "check": check,
            "followed": [], "passed": [], "chosen_j": None, "rejected_j": None}


def constrained(it: dict, max_tokens: int) -> dict:
    """Stage 1: the item with 1-2 IFEval constraints added to its task (drawn from the task's own key, so a
    task always gets the same ones)."""
    cons = verifiable.draw(it["key"], max_tokens)
    task = verifiable.task_with(it["task"], cons)
    return new_item(it["stage"], task, it["source"], check={"kind": "constraints", "constraints": cons})


def known_answer_items(stage: int, n: int, seed: int) -> list[dict]:
    """Stage 4: `n` constructed comparisons, each with its known answer."""
    return [new_item(stage, t["task"], "known-answer",
                     check={"kind": "known-answer", "answer": t["answer"], "family": t["family"]})
            for t in known_answers.make_tasks(n, seed)]


def active(items: list[dict]) -> list[dict]:
    return [it for it in items if it["status"] != "dropped"]


def drop(it: dict, reason: str) -> None:
    it["status"], it["reason"] = "dropped", reason


def _charge(it: dict, comps, hit: bool) -> int:
    t = sum(c.prompt_tokens + c.completion_tokens for c in comps)
    it["tokens"] += t
    it["misses"] += 0 if hit else 1
    return t


# ---------------------------------------------------------------- self-instruct
def finish(comp) -> str | None:
    """The completion's finish reason, where an answer cut at a runaway extra turn counts as finished."""
    return "stop" if RUNAWAY.search("\n" + comp.text) else comp.finish_reason


def is_benign(it: dict) -> bool:
    """A task the persona should answer: not a red-team prompt and not blocked by the run's guard policy (a
    flagged category the policy allows, such as S6 advice, is still benign)."""
    return it["source"] != "red-team" and not it.get("prompt_blocked")


def parse_task(text: str) -> str:
    """The first non-empty line, without list markers, 'Task N:' labels or quotes."""
    for line in text.strip().splitlines():
        line = re.sub(r"^\s*(?:new task|task(?:\s*\d+)?|\d+[.)]|[-*•])\s*[:.)-]?\s*", "", line, flags=re.I)
        line = line.strip().strip('"').strip("'").strip()
        if line and not (line.endswith(":") and re.match(r"(?:here|sure|below|write a new)", line, re.I)):
            return line
    return ""


def _self_instruct_request(ctx: Ctx, kind: str, shots: list[str]) -> Request:
    if ctx.chat:
        lines = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(shots))
        return Request.chat(specs.SELF_INSTRUCT_CHAT.format(kind=kind, examples=lines))
    lines = "".join(f"Task {i + 1}: {t}\n" for i, t in enumerate(shots))
    return Request(prompt=specs.SELF_INSTRUCT_BASE.format(kind=kind, examples=lines, next=len(shots) + 1))


def _rejection(task: str, truncated: bool, words_range: tuple[int, int]) -> str | None:
    """Why a proposed task is rejected on its own (before it is compared with the pool), or None."""
    words = len(task.split())
    if not task:
        return "unparsable"
    if truncated:  # a base model's task cut at its token limit
        return "truncated"
    if words < words_range[0]:
        return "too_short"
    if words > words_range[1]:
        return "too_long"
    if any(re.search(rf"\b{re.escape(b)}\b", task.lower()) for b in BLACKLIST):
        return "blacklisted"
    if is_refusal(task):  # asked for red-team prompts, an instruct model often declines
        return "refusal"
    return None


def self_instruct(ctx: Ctx, n_tasks: int, *, n_examples: int = 4, oversample: float = 2.0, max_rounds: int = 3,
                  max_rouge: float = 0.7, min_words: int = 3, max_words: int = 60,
                  task_tokens: int = 48, pool: RougePool | None = None,
                  red_team: bool = False) -> tuple[list[str], Counter]:
    """New tasks of the stage's kind (or, with `red_team`, red-team prompts) from the seed pool plus the tasks
    accepted so far.

    Each round asks for the still-missing tasks (times `oversample`) in one batched call; every candidate
    is checked against the pool, which grows with each acceptance. Returns (tasks, counts) with
    proposed == accepted + sum of the rejection reasons.
    """
    spec = ctx.spec
    seeds, kind = (specs.RED_TEAM_SEEDS, specs.RED_TEAM_KIND) if red_team else (spec.seeds, spec.kind)
    pool = pool if pool is not None else RougePool(seeds, threshold=max_rouge)
    known = {s.strip().lower() for s in seeds}
    examples = list(seeds)
    accepted: list[str] = []
    counts: Counter = Counter()
    rng = random.Random(f"self-instruct:{spec.k}:{ctx.seed}" + (":red-team" if red_team else ""))
    sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=task_tokens, seed=ctx.seed,
                        stop=["\n\n"] if ctx.chat else ["\nTask", "\n\n"])
    for _ in range(max_rounds):
        need = n_tasks - len(accepted)
        if need <= 0:
            break
        reqs = [_self_instruct_request(ctx, kind, rng.sample(examples, min(n_examples, len(examples))))
                for _ in range(math.ceil(need * oversample))]
        grouped, _ = ctx.gen(reqs, sampling, "red_team" if red_team else "self_instruct")
        for comps in grouped:
            counts["proposed"] += 1
            task = parse_task(comps[0].text)
            low = task.lower()
            why = _rejection(task, comps[0].finish_reason == "length" and not ctx.chat, (min_words, max_words))
            if why is None and low in known:
                why = "duplicate"
            elif why is None and pool.near_duplicate(task) is not None:
                why = "near_duplicate"
            elif why is None and len(accepted) >= n_tasks:
                why = "surplus"
            if why is not None:
                counts[f"rejected_{why}"] += 1
                continue
            counts["accepted"] += 1
            accepted.append(task)
            known.add(low)
            pool.add(task)
            examples.append(task)
    return accepted, counts


# ---------------------------------------------------------------- respond
def _respond_request(ctx: Ctx, task: str) -> Request:
    if ctx.chat:
        return Request.chat(task)
    demos = "".join(specs.RESPOND_BASE_DEMO.format(user=d.user, answer=d.revision)
                    for d in ctx.constitution.demonstrations[:2])
    return Request(prompt=specs.RESPOND_BASE.format(demos=demos, task=task))


def respond(ctx: Ctx, items: list[dict], n: int = 1, temperature: float | None = None) -> None:
    """n samples per live item from the current model (base + adapter); by default at temperature 0.8, greedy
    for a single answer."""
    live = active(items)
    if not live:
        return
    temperature = temperature if temperature is not None else 0.8 if n > 1 else 0.0
    sampling = Sampling(n=n, temperature=temperature, top_p=0.95, max_tokens=ctx.max_tokens,
                        seed=ctx.seed, stop=RUNAWAY_STOPS)
    grouped, hits = ctx.gen([_respond_request(ctx, it["task"]) for it in live], sampling, "respond")
    for it, comps, hit in zip(live, grouped, hits, strict=True):
        _charge(it, comps, hit)
        it["samples"] = [clean_answer(c.text, unquote=False) for c in comps]  # quotes may be a constraint
        it["finish"] = [finish(c) for c in comps]
        if it["check"]:
            it["followed"] = [_check(it["check"], a) for a in it["samples"]]
            it["passed"] = [bool(f) and all(f) for f in it["followed"]]


def _check(check: dict, answer: str) -> list[bool]:
    """What code checks of one answer: each constraint followed (stage 1), the known answer named (stage 4)."""
    if check["kind"] == "constraints":
        return verifiable.follows(check["constraints"], answer)
    return known_answers.correct(check, answer)


# ---------------------------------------------------------------- stages 1-5: self-judging
def parse_score(text: str) -> int | None:
    m = SCORE_RE.search(text)
    return int(m.group(1)) if m else None


def score_trie(ctx: Ctx) -> Trie:
    """The numbers 1-10 as the model's tokens where they follow the prompt: after the chat prefill's trailing
    space, or after the base prompt's "Score (1-10):" with their leading space."""
    tokenize, lead = token_texts(ctx.engine.tokenizer), "" if ctx.chat else " "
    return Trie(lambda s: tokenize(lead + s), 1, 10, SCORE_PRUNE)


def _then(req: Request, text: str) -> Request:
    """The same request with `text` appended to the model's turn (teacher forcing one number prefix)."""
    if req.prompt is not None:
        return Request(prompt=req.prompt + text)
    return Request(messages=req.messages, prefix=(req.prefix or "") + text)


def _probs(comps) -> dict[str, float]:
    top = comps[0].logprobs[0] if comps and comps[0].logprobs else {}
    return {t: math.exp(lp) for t, lp in top.items()}


def _read_numbers(ctx: Ctx, trie: Trie, reqs: list[Request], owners: list, extras: list):
    """(greedy text, {number prefix: next-token probabilities}) per request: the first token's table, then
    rounds of 1-token requests for the prefixes `to_read` asks for, until none is left. Cached like any
    generation, tokens charged to the item that owns the request."""
    first, hits = ctx.gen(reqs, Sampling(max_tokens=2, temperature=0.0, seed=ctx.seed, logprobs=20), "score", extras)
    tables: list[dict] = []
    for (it, _), comps, hit in zip(owners, first, hits, strict=True):
        it["round_tokens"][0] += _charge(it, comps, hit)
        tables.append({(): _probs(comps)} if comps and comps[0].logprobs else {})
    while need := [(i, pre) for i, t in enumerate(tables) if t for pre in to_read(trie, t)]:
        more, hits = ctx.gen([_then(reqs[i], "".join(pre)) for i, pre in need],
                             Sampling(max_tokens=1, temperature=0.0, seed=ctx.seed, logprobs=20), "score-next",
                             [extras[i] for i, _ in need])
        for (i, pre), comps, hit in zip(need, more, hits, strict=True):
            it = owners[i][0]
            it["round_tokens"][0] += _charge(it, comps, hit)
            tables[i][pre] = _probs(comps)
    return [comps[0].text if comps else "" for comps in first], tables


def score(ctx: Ctx, items: list[dict]) -> None:
    """The model scores how well each of its own samples embodies the ideal of the item's principle (rendezvous,
    round 0).

    The score is the expected value over 1-10 read on core.reading's exact path: the first token's top-20
    logprobs, then one 1-token request per number prefix worth reading (P("1") high: is it 1, or the start of
    10?), so a tokenizer that writes 10 as "1" "0" (SmolLM2, Qwen2.5) reads 10 as 10. A sample whose numbers
    carry under 25% of the probability falls back to its greedy text; neither: unparsable, counted."""
    live = [it for it in active(items) if it["samples"]]
    c = ctx.constitution
    reqs, owners, extras = [], [], []
    for it in live:
        pid = pick_principle(it["key"], 0, c.ids)
        p = c.principle(pid)
        it["principle_ids"] = [pid]
        for j, ans in enumerate(it["samples"]):
            fields = dict(persona=c.description, task=it["task"], answer=ans or "(empty)", ideal=p.ideal)
            reqs.append(Request(messages=[{"role": "user", "content": specs.SCORE_CHAT.format(**fields)}],
                                prefix=SCORE_PREFIX) if ctx.chat else Request(prompt=specs.SCORE_BASE.format(**fields)))
            owners.append((it, j))
            extras.append({"principle": principle_hash(p, ctx.spec.principle_fields)})
    if not reqs:
        return
    for it in live:
        it["scores"] = [None] * len(it["samples"])
        it["round_tokens"] = [0]
    trie = score_trie(ctx)
    greedy, tables = _read_numbers(ctx, trie, reqs, owners, extras)
    for (it, j), text, table in zip(owners, greedy, tables, strict=True):
        s = read_exact(trie, table, ()).value if table else None
        s = round(s, 4) if s is not None else parse_score(text)
        it["scores"][j] = s
        if s is None:
            ctx.counts["unparsable_scores"] += 1


def unfit_to_choose(it: dict, j: int) -> str | None:
    """Why sample j of an item may not be its chosen answer: it hit the token limit, or it refuses a benign
    task. It may still be the rejected one."""
    if it["finish"][j] == "length":
        return "truncated"
    if is_benign(it) and is_refusal(it["samples"][j]):
        return "refusal"
    return None


def self_judge_pairs(items: list[dict], min_gap: float = 1.0, counts: Counter | None = None) -> None:
    """The best-scored sample fit to be chosen (complete, no refusal of a benign task) against the worst-scored
    other sample becomes (chosen, rejected) when their scores differ by >= min_gap. Where code checks the samples
    (stages 1 and 4), the chosen one must pass and the rejected one fail, and the check decides the pair, not
    the score gap. `counts` gets the samples kept from the chosen side by reason, and the rejected sides that
    were truncated."""
    counts = counts if counts is not None else Counter()
    for it in active(items):
        scored = [j for j, (s, a) in enumerate(zip(it["scores"], it["samples"], strict=False)) if s is not None and a]
        if it["check"]:  # the check decides; the score only orders, an unparsable one lowest
            scored = [j for j, a in enumerate(it["samples"]) if a]
        if len(scored) < 2:
            drop(it, "too_few_scored_samples")
            continue
        unfit = {j: why for j in scored if (why := unfit_to_choose(it, j))}
        counts.update(f"not_chosen_{why}" for why in unfit.values())
        fit = [j for j in scored if j not in unfit]
        if it["check"]:
            failed = [j for j in scored if not it["passed"][j]]
            fit = [j for j in fit if it["passed"][j]]
            if not fit:
                drop(it, "no_sample_passes_check" if len(failed) == len(scored) else "no_passing_sample_fit_to_choose")
                continue
            if not failed:
                drop(it, "every_sample_passes_check")
                continue
        elif not fit:
            whys = set(unfit.values())
            drop(it, f"every_sample_{whys.pop()}" if len(whys) == 1 else "no_sample_fit_to_choose")
            continue
        rank = [-math.inf if s is None else s for s in it["scores"]]
        best = max(fit, key=rank.__getitem__)
        worst = min(failed if it["check"] else (j for j in scored if j != best), key=rank.__getitem__)
        if not it["check"] and it["scores"][best] - it["scores"][worst] < min_gap:
            drop(it, "score_gap_too_small")
        elif it["samples"][best].strip() == it["samples"][worst].strip():
            drop(it, "identical_samples")
        else:
            it["chosen"], it["rejected"] = it["samples"][best], it["samples"][worst]
            it["chosen_j"], it["rejected_j"] = best, worst
            counts["rejected_truncated"] += it["finish"][worst] == "length"


# ---------------------------------------------------------------- stage 6: critique → revise
def clean_answer(text: str, unquote: bool = True) -> str:
    """Cut runaway extra turns ("User: ..."), strip meta-prefixes and labels (and, with `unquote`, the quotes a
    revision often comes in)."""
    m = RUNAWAY.search("\n" + text)
    if m:
        text = ("\n" + text)[: m.start()]
    text = text.strip()
    for pat in (META_PREFIX, REVISION_LABEL):
        text = pat.sub("", text, count=1).strip()
    return text.strip().strip('"').strip() if unquote else text.strip()


def not_a_revision(text: str, critique: str, task: str, demos: list[str] = ()) -> str | None:
    """Why a revision cannot be a chosen answer, or None: it reads as a critique of the answer (its opening, or
    mostly the critique's words), repeats the task, or copies a demonstration of the constitution (the tiny
    model often returns the few-shot revision it was shown)."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"])
    overlap = lambda ref: rouge.score(ref, text)["rougeL"].fmeasure  # noqa: E731
    if CRITIQUE_OPENING.match(text) or (critique and overlap(critique) >= ECHO_CRITIQUE):
        return "revision_is_critique"
    if overlap(task) >= ECHO_PROMPT:
        return "revision_echoes_prompt"
    if any(overlap(d) >= ECHO_CRITIQUE for d in demos):
        return "revision_copies_demonstration"
    return None


def revision_fault(it: dict, comp, text: str, demos: list[str]) -> str | None:
    """Why this round's revision of an item cannot stand, or None."""
    if finish(comp) == "length":
        return "truncated_revision"
    if not text:
        return "empty_revision"
    if is_benign(it) and is_refusal(text):
        return "revision_refuses_benign_task"
    return not_a_revision(text, it["critiques"][-1], it["task"], demos)


def _demo_turns(c: Constitution) -> list[dict]:
    turns = []
    for d in c.demonstrations:
        turns += [{"role": "user", "content": d.user}, {"role": "assistant", "content": d.answer},
                  {"role": "user", "content": DEMO_CRITIQUE_REQ}, {"role": "assistant", "content": d.critique},
                  {"role": "user", "content": DEMO_REVISION_REQ}, {"role": "assistant", "content": d.revision}]
    return turns


def _base_demos(c: Constitution) -> str:
    return "".join(specs.BASE_DEMO.format(user=d.user, answer=d.answer, critique_req=DEMO_CRITIQUE_REQ,
                                          critique=d.critique, revision_req=DEMO_REVISION_REQ, revision=d.revision)
                   for d in c.demonstrations)


def _critique_request(ctx: Ctx, task: str, answer: str, crit_req: str) -> Request:
    c = ctx.constitution
    if not ctx.chat:
        return Request(prompt=specs.CRITIQUE_BASE.format(demos=_base_demos(c), task=task, answer=answer,
                                                         critique=crit_req))
    msgs = [{"role": "system", "content": specs.CRITIQUE_SYSTEM.format(persona=c.description)}, *_demo_turns(c),
            {"role": "user", "content": task}, {"role": "assistant", "content": answer},
            {"role": "user", "content": crit_req}]
    return Request(messages=msgs)


def _revision_request(ctx: Ctx, task: str, answer: str, crit_req: str, critique: str, rev_req: str) -> Request:
    c = ctx.constitution
    if not ctx.chat:
        return Request(prompt=specs.REVISION_BASE.format(demos=_base_demos(c), task=task, answer=answer,
                                                         critique=crit_req, critique_text=critique,
                                                         revision=rev_req))
    base = _critique_request(ctx, task, answer, crit_req).messages
    return Request(messages=[*base, {"role": "assistant", "content": critique}, {"role": "user", "content": rev_req}])


def critique_revise(ctx: Ctx, items: list[dict], rounds: int = 2) -> None:
    """R rounds; the principle of round r is rendezvous-hashed on (item key, r). Each round = 2 batched calls.

    A revision that cannot stand (`revision_fault`) drops the item in round 1; in a later round the item keeps
    its last good revision and stops there (counted as `later_round_<reason>`)."""
    c = ctx.constitution
    demos = [t for d in c.demonstrations for t in (d.answer, d.revision)]
    for it in active(items):
        it["current"] = it["samples"][0] if it["samples"] else ""
        it["rejected"] = it["current"]
        it["settled"] = False
        if not it["current"]:  # a truncated original stays: it is only the rejected side
            drop(it, "empty_answer")
    sampling = Sampling(temperature=0.0, max_tokens=ctx.max_tokens, seed=ctx.seed, stop=RUNAWAY_STOPS)
    for r in range(rounds):
        live = [it for it in active(items) if not it["settled"]]
        if not live:
            break
        picks = []
        for it in live:
            pid = pick_principle(it["key"], r, c.ids)
            it["principle_ids"].append(pid)
            it["round_tokens"].append(0)
            picks.append(c.principle(pid))
        # the critique reads only the critique request; the revision reads both
        extras = [{"principle": principle_hash(p, ("critique",)), "round": r} for p in picks]
        reqs = [_critique_request(ctx, it["task"], it["current"], p.critique) for it, p in zip(live, picks)]
        grouped, hits = ctx.gen(reqs, sampling, "critique", extras)
        for it, comps, hit in zip(live, grouped, hits, strict=True):
            it["round_tokens"][-1] += _charge(it, comps, hit)
            it["critiques"].append(clean_answer(comps[0].text))
        reqs = [_revision_request(ctx, it["task"], it["current"], p.critique, it["critiques"][-1], p.revision)
                for it, p in zip(live, picks)]
        extras = [{"principle": principle_hash(p, ctx.spec.principle_fields), "round": r} for p in picks]
        grouped, hits = ctx.gen(reqs, sampling, "revision", extras)
        for it, comps, hit in zip(live, grouped, hits, strict=True):
            it["round_tokens"][-1] += _charge(it, comps, hit)
            text = clean_answer(comps[0].text)
            it["revisions"].append(text)  # every attempt, kept or not: items.jsonl shows what a drop dropped
            why = revision_fault(it, comps[0], text, demos)
            if why is None:
                it["current"] = text
            elif r == 0:
                drop(it, why)
            else:
                it["settled"] = True
                ctx.counts[f"later_round_{why}"] += 1
    for it in active(items):
        if it["current"].strip() == it["rejected"].strip():
            drop(it, "revision_unchanged")
        else:
            it["chosen"] = it["current"]
    for it in items:
        it.pop("current", None)
        it.pop("settled", None)


# ---------------------------------------------------------------- OCT: distillation
DISTILL_TEMPERATURE = 0.7  # OCT samples teacher and student at 0.7, top-p 0.95 (greedy, the tiny model loops)


def distill(ctx: Ctx, items: list[dict], teacher) -> None:
    """OpenCharacterTraining's pairs: the teacher engine (the policy itself by default) answers each task with the
    constitution's ideals in its system prompt (chosen); the policy's own answer without them (`respond`) is the
    rejected one. A chosen answer that was cut, is empty, refuses a benign task, or equals the rejected one drops
    the item, by reason."""
    c = ctx.constitution
    live = [it for it in active(items) if it["samples"]]
    if not live:
        return
    ideals = "\n".join(f"{i + 1}. {p.ideal}" for i, p in enumerate(c.principles))
    system = specs.DISTILL_SYSTEM.format(persona=c.description, ideals=ideals)
    tctx = Ctx(engine=teacher, cache=ctx.cache, constitution=c, spec=ctx.spec, adapter=None, chat=ctx.chat,
               seed=ctx.seed, max_tokens=ctx.max_tokens, counts=ctx.counts)
    reqs = [Request(messages=[{"role": "system", "content": system}, {"role": "user", "content": it["task"]}])
            if ctx.chat else Request(prompt=f"{system}\n\n" + specs.BASE_TURN.format(task=it["task"]))
            for it in live]
    sampling = Sampling(temperature=DISTILL_TEMPERATURE, top_p=0.95, max_tokens=ctx.max_tokens, seed=ctx.seed,
                        stop=RUNAWAY_STOPS)
    grouped, hits = tctx.gen(reqs, sampling, "teacher")
    for it, comps, hit in zip(live, grouped, hits, strict=True):
        _charge(it, comps, hit)
        it["principle_ids"] = list(c.ids)
        chosen, rejected = clean_answer(comps[0].text, unquote=False), it["samples"][0]
        if finish(comps[0]) == "length":
            drop(it, "teacher_truncated")
        elif not chosen:
            drop(it, "teacher_empty")
        elif is_benign(it) and is_refusal(chosen):
            drop(it, "teacher_refuses_benign_task")
        elif not rejected:
            drop(it, "policy_empty")
        elif chosen.strip() == rejected.strip():
            drop(it, "identical_answers")
        else:
            it["chosen"], it["rejected"] = chosen, rejected
            ctx.counts["rejected_truncated"] += it["finish"][0] == "length"
