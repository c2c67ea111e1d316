"""How the project writes files and opens databases, in one place.

Every write is atomic (a temp file or directory beside the target, then `os.replace`), so a run killed
at any moment leaves either the old output or the new one, never half of one. Every SQLite file is
opened the same way (WAL, one busy timeout), and every content hash is taken over one canonical JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SQLITE_TIMEOUT_S = 60.0
_UMASK = os.umask(0)  # read once at import (setting it is process-wide: not from threads later)
os.umask(_UMASK)  # a writer waits this long for another process's transaction before failing


def canonical_json(obj: Any) -> str:
    """The one serialisation behind every content hash and cache key: sorted keys, no spaces, UTF-8 kept.
    Strict: a value JSON cannot hold raises rather than being stringified into a key that never matches."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `path` to write however the caller likes (np.savez, a dataset writer);
    it becomes `path` only when the block succeeds. `suffix` keeps writers that append one (np.savez:
    ".npz") from writing elsewhere."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make every output owner-only
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _plain(o: Any) -> Any:
    """JSON for what json cannot write itself: numpy scalars and arrays as numbers, anything else (paths,
    dates) as text."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Human-readable JSON (manifests, summaries)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_plain, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, default=_plain, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `out`; swap it in as `out` only when the block succeeds, so a killed
    run never leaves a half-written directory that looks finished. An older `out` is replaced whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        swap_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def resumable_dir(out: str | Path, key: Any, fresh: bool = False) -> Iterator[Path]:
    """Like `atomic_dir`, but the work directory (`partial_dir(out)`) outlives a kill: a rerun
    with the same `key` (what the work is made from) gets it back with what it holds, to carry on from there;
    any other key, or `fresh`, starts it empty. Swapped in as `out` when the block succeeds; kept when it fails."""
    out = Path(out)
    work = partial_dir(out)
    key_file = work / ".key.json"
    key_text = canonical_json(key)
    if work.exists() and (fresh or not (key_file.is_file() and key_file.read_text() == key_text)):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(key_file, key_text)
    yield work
    key_file.unlink()
    swap_dir(work, out)


def partial_dir(out: str | Path) -> Path:
    """Where `resumable_dir` builds `out`: `.<name>.partial` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def swap_dir(new: Path, out: Path) -> None:
    """Put directory `new` at `out`. An existing `out` is moved aside first and removed after, so `out` is
    always the old directory or the new one, except for the instant between two renames (a reader then finds
    none: never half of one)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


def open_sqlite(path: str | Path, *, autocommit: bool = False, readonly: bool = False) -> sqlite3.Connection:
    """WAL (readers never block the writer; a commit survives kill -9 of the process) with synchronous
    NORMAL, shared between threads (callers hold their own lock where they need one). `autocommit`
    commits every statement; otherwise the caller commits (`with db:`). `readonly` opens an existing file
    without creating or changing anything (reports read ledgers this way)."""
    path = Path(path)
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S, check_same_thread=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S, check_same_thread=False,
                         isolation_level=None if autocommit else "DEFERRED")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's data; MissingInput when it does not exist, BadInput when it does not parse, both naming
    `what` it is and the file."""
    import yaml

    from cai_bootstrap.core.errors import BadInput, MissingInput

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInput(f"{what}: {path} does not exist") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{what}: {path} is not valid YAML: {e}") from None
