"""A small content-addressed JSON store (SQLite, WAL) for evaluation results that are neither engine
generations nor judge calls: guard verdicts and lm-eval runs. Neither `engine.cache` (Completion rows)
nor `judge.cache` (chat requests) fits those values, and a dozen lines of SQLite do, hence this module.
A value is committed the moment it is computed, so a killed evaluation never redoes finished work."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_bootstrap.core.io import open_sqlite, sha256_json


class ResultStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_sqlite(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, kind TEXT, value TEXT,"
                         " created REAL)")
        self._db.commit()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(kind: str, parts: Any) -> str:
        return sha256_json({"kind": kind, "parts": parts})

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        uniq = list(dict.fromkeys(keys))
        with self._lock:
            for s in range(0, len(uniq), 500):
                chunk = uniq[s : s + 500]
                q = f"SELECT key, value FROM results WHERE key IN ({','.join('?' * len(chunk))})"
                out.update({k: json.loads(v) for k, v in self._db.execute(q, chunk).fetchall()})
        self.hits += len(out)
        self.misses += len(uniq) - len(out)
        return out

    def get(self, key: str) -> Any | None:
        return self.get_many([key]).get(key)

    def put_many(self, kind: str, items: Sequence[tuple[str, Any]]) -> None:
        now = time.time()
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                                 [(k, kind, json.dumps(v, default=str), now) for k, v in items])

    def put(self, kind: str, key: str, value: Any) -> None:
        self.put_many(kind, [(key, value)])

    def close(self) -> None:
        with self._lock:
            self._db.close()
