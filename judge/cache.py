"""Content-addressed SQLite (WAL) cache of judge responses.

The key is sha256 of the canonical request: judge model, messages, every sampling setting and the judge
template's version. Nothing volatile (ids, timestamps, endpoint, key) goes in, so a rerun, a resume after
kill -9 or a different provider serving the same model all hit. Each part's own hash is stored too, so
`explain_miss` can say which part differs from the nearest cached request.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cai_bootstrap.core.io import canonical_json, open_sqlite, sha256_json

KEY_PARTS = ("model", "messages", "sampling", "template")


class ChatRequest(BaseModel):
    """One judge call, provider-independent."""

    messages: list[dict[str, str]]
    max_tokens: int | None = 1  # None for reasoning models, which take `max_completion_tokens` instead
    temperature: float | None = 0.0  # None: the provider's default (reasoning models accept only that)
    top_p: float | None = 1.0  # None: not sent (reasoning models reject it)
    logprobs: bool = False
    top_logprobs: int | None = None
    seed: int | None = 0
    response_format: dict[str, Any] | None = None
    # added later; in the cache key only when set, so keys of requests made before stay the same
    max_completion_tokens: int | None = None
    prefill: str | None = None  # the start of the assistant's answer, continued by the model (vLLM servers)

    def sampling(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"messages", *_OPTIONAL})
        return d | {k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None}

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": self.messages, **self.sampling()}
        if not self.logprobs:  # reasoning models reject the parameter itself
            body.pop("logprobs")
            body.pop("top_logprobs")
        if (prefill := body.pop("prefill", None)) is not None:
            # vLLM's chat API continues a final assistant message instead of opening a new turn
            body["messages"] = [*self.messages, {"role": "assistant", "content": prefill}]
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        return {k: v for k, v in body.items() if v is not None}

    @property
    def max_out(self) -> int:
        """The most output tokens this request may be billed for (reasoning tokens included)."""
        return self.max_completion_tokens or self.max_tokens or 0

    def prompt_bytes(self) -> int:
        # upper bound on prompt tokens: every BPE token covers >= 1 byte; + chat-template overhead per turn
        return sum(len(m.get("content", "").encode()) + 16 for m in self.messages) + 16 + len(self.prefill or "")


_OPTIONAL = ("max_completion_tokens", "prefill")


def key_parts(model: str, req: ChatRequest, template_version: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": req.messages,
        "sampling": req.sampling(),
        "template": template_version,
    }


def cache_key(model: str, req: ChatRequest, template_version: str) -> str:
    return sha256_json(key_parts(model, req, template_version))


def _part_hashes(parts: dict[str, Any]) -> list[str]:
    return [sha256_json(parts[p])[:16] for p in KEY_PARTS]


class Cache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = open_sqlite(self.path, autocommit=True)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS judge_cache (key TEXT PRIMARY KEY, h_model TEXT, h_messages TEXT,"
            " h_sampling TEXT, h_template TEXT, parts TEXT, response TEXT, created REAL)"
        )
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT response FROM judge_cache WHERE key=?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, parts: dict[str, Any], response: dict) -> None:
        """Committed immediately (autocommit): a kill after this line never loses the paid result."""
        self.db.execute(
            "INSERT OR REPLACE INTO judge_cache VALUES (?,?,?,?,?,?,?,?)",
            (key, *_part_hashes(parts), canonical_json(parts), canonical_json(response), time.time()),
        )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM judge_cache").fetchone()[0]

    def explain_miss(self, model: str, req: ChatRequest, template_version: str) -> str:
        """Which key part(s) differ from the nearest cached request (most equal parts wins)."""
        parts = key_parts(model, req, template_version)
        key = cache_key(model, req, template_version)
        if self.db.execute("SELECT 1 FROM judge_cache WHERE key=?", (key,)).fetchone():
            return "hit: this exact request is cached"
        h = _part_hashes(parts)
        row = self.db.execute(
            "SELECT parts, (h_model=?)+(h_messages=?)+(h_sampling=?)+(h_template=?) AS same FROM judge_cache"
            " ORDER BY same DESC LIMIT 1",
            h,
        ).fetchone()
        if row is None:
            return "miss: the cache is empty"
        near = json.loads(row[0])
        diffs = [_diff_part(p, near[p], parts[p]) for p in KEY_PARTS
                 if canonical_json(near[p]) != canonical_json(parts[p])]
        return f"miss: nearest cached request differs in {len(diffs)} part(s): " + "; ".join(diffs)

    def close(self) -> None:
        self.db.close()


def _short(v: Any, n: int = 60) -> str:
    s = v if isinstance(v, str) else canonical_json(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _diff_part(part: str, old: Any, new: Any) -> str:
    if part == "sampling":
        keys = sorted(set(old) | set(new))
        fields = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
        return "sampling (" + ", ".join(fields) + ")"
    if part == "messages":
        if len(old) != len(new):
            return f"messages (count {len(old)} -> {len(new)})"
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            for f in sorted(set(a) | set(b)):
                if a.get(f) != b.get(f):
                    x, y = a.get(f) or "", b.get(f) or ""
                    at = next(
                        (j for j, (c, d) in enumerate(zip(x, y, strict=False)) if c != d), min(len(x), len(y))
                    )
                    return (
                        f"messages[{i}].{f} (first difference at char {at}: "
                        f"{_short(x[at : at + 40])!r} -> {_short(y[at : at + 40])!r})"
                    )
    return f"{part} ({_short(old)!r} -> {_short(new)!r})"
