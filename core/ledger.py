"""The project's cost ledger: one SQLite (WAL) table every phase writes to.

API calls record tokens and $ (kind="api", cached=1 rows cost $0); engine phases record seconds and
seconds x $/GPU-hour (kind="engine", estimated=1). `total_usd(run)` and `summary(run)` read it back.
"""

from __future__ import annotations

import time
from pathlib import Path

from cai_bootstrap.core.io import open_sqlite

COLUMNS = (
    "ts",
    "run",
    "phase",
    "stage",
    "persona",
    "purpose",
    "kind",
    "endpoint",
    "model",
    "item",
    "tokens_in",
    "tokens_out",
    "seconds",
    "usd",
    "estimated",
    "cached",
    "note",
)


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = open_sqlite(self.path, autocommit=True)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY, ts REAL NOT NULL, run TEXT NOT NULL,"
            " phase TEXT, stage INTEGER, persona TEXT, purpose TEXT, kind TEXT NOT NULL, endpoint TEXT,"
            " model TEXT, item TEXT, tokens_in INTEGER DEFAULT 0, tokens_out INTEGER DEFAULT 0,"
            " seconds REAL DEFAULT 0, usd REAL DEFAULT 0, estimated INTEGER DEFAULT 0,"
            " cached INTEGER DEFAULT 0, note TEXT)"
        )
        if "note" not in {r[1] for r in self.db.execute("PRAGMA table_info(ledger)")}:  # a ledger made before
            self.db.execute("ALTER TABLE ledger ADD COLUMN note TEXT")
        self.db.execute("CREATE INDEX IF NOT EXISTS ledger_run ON ledger(run)")

    def record(
        self,
        *,
        run: str,
        kind: str = "api",
        phase: str | None = None,
        stage: int | str | None = None,  # a stage number, or a named step ("introspect")
        persona: str | None = None,
        purpose: str | None = None,
        endpoint: str | None = None,
        model: str | None = None,
        item: str | None = None,
        tokens_in: int = 0,
        tokens_out: int = 0,
        seconds: float = 0.0,
        usd: float = 0.0,
        estimated: bool = False,
        cached: bool = False,
        note: str | None = None,
    ) -> None:
        """One row, committed at once. A cached row is never billed: its $ is forced to 0. `note` flags what a
        reader of the bill must know (a timeout booked at its reservation, usage reported past it)."""
        self.db.execute(
            f"INSERT INTO ledger ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})",
            (
                time.time(),
                run,
                phase,
                stage,
                persona,
                purpose,
                kind,
                endpoint,
                model,
                item,
                tokens_in,
                tokens_out,
                seconds,
                0.0 if cached else usd,
                int(estimated),
                int(cached),
                note,
            ),
        )

    def total_usd(self, run: str | None = None, purpose: str | None = None) -> float:
        q, args = "SELECT COALESCE(SUM(usd),0) FROM ledger WHERE cached=0", []
        if run is not None:
            q, args = q + " AND run=?", [run]
        if purpose is not None:
            q, args = q + " AND purpose=?", [*args, purpose]
        return float(self.db.execute(q, args).fetchone()[0])

    def summary(self, run: str | None = None) -> list[dict]:
        """$ and volume grouped by run, phase, purpose, kind, endpoint and model."""
        where, args = ("WHERE run=?", [run]) if run is not None else ("", [])
        rows = self.db.execute(
            "SELECT run, phase, purpose, kind, endpoint, model, COUNT(*), SUM(cached), SUM(tokens_in),"
            f" SUM(tokens_out), SUM(seconds), SUM(usd) FROM ledger {where}"
            " GROUP BY run, phase, purpose, kind, endpoint, model ORDER BY run, phase, purpose",
            args,
        ).fetchall()
        keys = (
            "run",
            "phase",
            "purpose",
            "kind",
            "endpoint",
            "model",
            "rows",
            "cached",
            "tokens_in",
            "tokens_out",
            "seconds",
            "usd",
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def close(self) -> None:
        self.db.close()
