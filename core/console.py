"""What the researcher reads, and where everything else goes.

`console` is the project's one console: phase headings, progress, summaries, errors. Libraries (vLLM,
transformers, TRL, datasets, torch) write warnings, progress bars and their own logs to file descriptor 2,
from this process and from the processes they start; `quiet(path)` points descriptor 2 at a log file and
keeps `console` on the terminal, so a run's console shows only the project's lines. `move_log(path)` moves
the log into the run directory once the run is known (the earlier lines are carried over). `--verbose` skips
all of it. Redirecting the descriptor, not Python's sys.stderr, is what catches C++ warnings, subprocesses
and handlers that libraries bound to stderr at import.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
_log: Path | None = None  # the file descriptor 2 writes to, once quiet


def quiet(path: str | Path) -> Path:
    """Send descriptor 2 to `path` (appended) and keep `console` on the terminal; returns the log's path."""
    global _log
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _log is None:
        console.file = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    _log = path  # warnings and loggers without a handler (logging's last resort) write to descriptor 2 too
    return path


def move_log(path: str | Path) -> Path | None:
    """Continue the log at `path` (a run directory's), with what was logged so far; None when not quiet."""
    if _log is None:
        return None
    path = Path(path)
    if path == _log:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _log
    with old.open("rb") as src, path.open("ab") as dst:
        shutil.copyfileobj(src, dst)
    quiet(path)
    old.unlink(missing_ok=True)
    return path


def log_path() -> Path | None:
    return _log
