"""Where a recorded run's time went, from its ledger alone: per phase and purpose, the rows, the engine seconds
booked, and the wall-clock span from the run's first ledger row to the phase's first and last row. A demo run also
has `demo.json` (each phase's wall seconds, written as the demo goes); this reads runs made before it, too.

Prints one JSON object. `python bench/run_phases.py data/runs/<id>`.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path


def phases(run_dir: Path) -> dict:
    db = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    t0 = db.execute("SELECT MIN(ts) FROM ledger").fetchone()[0]
    rows = db.execute(
        "SELECT phase, purpose, COUNT(*), SUM(seconds), SUM(usd), MIN(ts), MAX(ts) FROM ledger "
        "GROUP BY phase, purpose ORDER BY MIN(ts)").fetchall()
    out = [{"phase": p, "purpose": u, "rows": n, "engine_seconds": round(s or 0, 1), "usd": round(d or 0, 6),
            "first_row_s": round(a - t0, 1), "last_row_s": round(b - t0, 1)} for p, u, n, s, d, a, b in rows]
    demo = run_dir / "demo.json"
    return {"run": run_dir.name, "ledger_span_s": round(max(r["last_row_s"] for r in out), 1), "phases": out,
            "demo": json.loads(demo.read_text()) if demo.is_file() else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    print(json.dumps(phases(ap.parse_args().run_dir), indent=1))


if __name__ == "__main__":
    main()
