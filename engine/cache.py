"""Content-addressed generation cache (SQLite, WAL) and `cached_generate`, a wrapper over any Engine.

The key of a generation is sha256 over canonical JSON of everything that determined it: the rendered
request text, the engine backend and model fingerprint, the adapter's content hash, the template id,
the sampling (incl. seed and n) and any caller extras (e.g. the principle's text). A rerun with nothing
changed is served entirely from the cache; every miss of a call goes to the engine in ONE batched call
and is committed as soon as that call returns, so a killed run never pays twice for finished work.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_bootstrap.core.io import canonical_json, open_sqlite, sha256_json
from cai_bootstrap.engine.types import Completion, Request, Sampling

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    completions TEXT NOT NULL,      -- JSON list of Completion dicts (n samples), request_index 0
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    meta TEXT,                      -- JSON: what the key was made of (minus the prompt), for audits
    created REAL NOT NULL
);
"""


class GenerationCache:
    """One SQLite file; safe to share between processes (WAL) and threads (one lock per instance)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_sqlite(self.path)
        self._db.executescript(SCHEMA)
        self._db.commit()
        self.hits = 0
        self.misses = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]

    def __contains__(self, key: str) -> bool:
        return bool(self.get_many([key]))

    def get_many(self, keys: Sequence[str]) -> dict[str, list[Completion]]:
        out: dict[str, list[Completion]] = {}
        uniq = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(uniq), 500):  # SQLite's bound-parameter limit
                chunk = uniq[start : start + 500]
                rows = self._db.execute(
                    f"SELECT key, completions FROM generations WHERE key IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
                for key, blob in rows:
                    out[key] = [Completion.model_validate(c) for c in json.loads(blob)]
        return out

    def put_many(self, items: Sequence[tuple[str, list[Completion], dict | None]]) -> None:
        """Insert a batch in one transaction; an existing key keeps its first value (content addressing)."""
        rows = [
            (key, json.dumps([c.model_dump(mode="json") for c in comps]),
             comps[0].prompt_tokens if comps else 0, sum(c.completion_tokens for c in comps),
             canonical_json(meta) if meta is not None else None, time.time())
            for key, comps, meta in items
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT OR IGNORE INTO generations VALUES (?, ?, ?, ?, ?, ?)", rows)

    def tokens(self, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(prompt_tokens, completion_tokens) per cached key: the cost estimate of regenerating it."""
        out = {}
        uniq = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(uniq), 500):
                chunk = uniq[start : start + 500]
                q = f"SELECT key, prompt_tokens, completion_tokens FROM generations WHERE key IN " \
                    f"({','.join('?' * len(chunk))})"
                out.update({k: (p, c) for k, p, c in self._db.execute(q, chunk).fetchall()})
        return out


def _adapter_id(adapter: str | Path | None) -> str | None:
    if adapter is None:
        return None
    from cai_bootstrap.engine.base import adapter_hash

    return adapter_hash(adapter)


def _key(engine, rendered: str, sampling: Sampling, adapter_id: str | None, template_id: str | None,
         extra: Any) -> str:
    return sha256_json({
        "v": 1,
        "engine": engine.name,
        "model": engine.fingerprint,
        "adapter": adapter_id,
        "template": template_id,
        "sampling": sampling.model_dump(mode="json"),
        "rendered": rendered,
        "extra": extra,
    })


def generation_key(engine, request: Request, sampling: Sampling, adapter: str | Path | None = None,
                   template_id: str | None = None, extra: Any = None) -> str:
    """The cache key of one request's n samples. `extra` is any JSON-able value that also determined it."""
    return _key(engine, engine.render(request), sampling, _adapter_id(adapter), template_id, extra)


def cached_generate_with_hits(
    engine, cache: GenerationCache, requests: Sequence[Request], sampling: Sampling | None = None,
    adapter: str | Path | None = None, extra_keys: Sequence[Any] | None = None, template_id: str | None = None,
) -> tuple[list[Completion], list[bool], list[str]]:
    """Like `cached_generate`, also returning per request whether it was a hit, and its key."""
    sampling = sampling or Sampling()
    if extra_keys is not None and len(extra_keys) != len(requests):
        raise ValueError(f"extra_keys has {len(extra_keys)} entries for {len(requests)} requests")
    ah = _adapter_id(adapter)
    keys = [
        _key(engine, engine.render(r), sampling, ah, template_id, extra_keys[i] if extra_keys is not None else None)
        for i, r in enumerate(requests)
    ]
    found = cache.get_many(keys)
    miss_keys = list(dict.fromkeys(k for k in keys if k not in found))  # identical requests are paid once
    if miss_keys:
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        batch = [requests[first[k]] for k in miss_keys]
        outs = engine.generate(batch, sampling, adapter=adapter)
        per: dict[int, list[Completion]] = {}
        for c in outs:
            per.setdefault(c.request_index, []).append(c)
        new = []
        for j, k in enumerate(miss_keys):
            comps = [c.model_copy(update={"request_index": 0}) for c in sorted(per.get(j, []),
                                                                              key=lambda c: c.sample_index)]
            found[k] = comps
            new.append((k, comps, {"engine": engine.name, "model": engine.fingerprint, "adapter": ah,
                                   "template": template_id}))
        cache.put_many(new)  # committed per batch: a kill after this loses nothing paid for
    missed = set(miss_keys)
    hits = [k not in missed for k in keys]
    cache.hits += sum(hits)
    cache.misses += len(miss_keys)
    result = [c.model_copy(update={"request_index": i}) for i, k in enumerate(keys) for c in found[k]]
    return result, hits, keys


def cached_generate(
    engine, cache: GenerationCache, requests: Sequence[Request], sampling: Sampling | None = None,
    adapter: str | Path | None = None, extra_keys: Sequence[Any] | None = None, template_id: str | None = None,
) -> list[Completion]:
    """`engine.generate` through the cache: same result shape (request-major, n samples per request)."""
    return cached_generate_with_hits(engine, cache, requests, sampling, adapter, extra_keys, template_id)[0]
