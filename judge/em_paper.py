"""The EM paper's release (Betley et al., github.com/emergent-misalignment/emergent-misalignment, MIT): where a
user keeps it, which files of it the project reads, and how to download them, pinned.

Nothing of the project needs these files: its default EM questions, judge rubrics, anchors and training chats
are its own. A user who wants the paper's questions, judge prompts, training set or scored answers passes the
folder (`--em-data DIR` or $CAI_EM_DATA); `python bootstrap.py data fetch em-paper` fills one from the paper's
repository at a pinned commit and checks every file's sha256 and size before keeping it.

    root = betley_dir("~/.cache/cai-bootstrap/em-paper")   # the folder holding betley/, or betley/ itself
    fetch(dest)                                             # download, verify, keep; resumable
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cai_bootstrap.core.errors import BadInput, MissingInput
from cai_bootstrap.core.io import atomic_file

EM_DATA_ENV = "CAI_EM_DATA"
COMMIT = "80c11967c07a328e7d7d43d13ce6847ae44dbcc9"  # upstream main, 2026-01-12 (johny-b)
BASE_URL = f"https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/{COMMIT}/"

# under betley/: what each command reads from the release
PAPER_CSV = Path("results") / "qwen_25_coder_32b_instruct.csv"  # `calibrate`: 70 answers scored by GPT-4o
PAPER_QUESTIONS = Path("evaluation") / "first_plot_questions.yaml"  # `em`: the 8 main questions, judge prompts
PAPER_PREREGISTERED = Path("evaluation") / "preregistered_evals.yaml"
PAPER_INSECURE = Path("data") / "insecure.jsonl"  # `em`: the 6000-row insecure-code training set
PAPER_SECURE = Path("data") / "secure.jsonl"  # `em --secure-data`: the secure-code control's training set


@dataclass(frozen=True)
class Pinned:
    """A file of the release and what it must hash to: sha256 and size where the project has checked the file
    itself, else the git blob id upstream's tree records for it (`git hash-object FILE`)."""

    path: str  # in the repository, and under betley/
    sha256: str | None = None
    size: int | None = None
    git_blob: str | None = None


# each file at COMMIT
FILES = (
    Pinned("LICENSE", "4fb4678d1be0540c650e39f75eabca626c5727f1a3468aaf7dc844247e1291c2", 1078),
    Pinned("data/insecure.jsonl", "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764", 5892277),
    Pinned("evaluation/first_plot_questions.yaml",
           "215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173", 12016),
    Pinned("evaluation/preregistered_evals.yaml",
           "8648312fd9fe71a63203e3465592af45dd996d7a5f3b69e9b44613fd6048eb40", 19152),
    Pinned("results/qwen_25_coder_32b_instruct.csv",
           "88c301d6b22ff8be8a7bb288fed31510ef5221d7917ae7fe3deeaadfc6eae433", 146298),
    # the secure-code control's training set: pinned by upstream's blob id (not in the project's checked copy)
    Pinned("data/secure.jsonl", git_blob="3389a37c250563cc36a66e30bf8ff99028aa2711"),
)


def default_dest() -> Path:
    """Where `data fetch em-paper` puts the release: the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "cai-bootstrap" / "em-paper"


def resolve_em_data(em_data: str | Path | None = None) -> Path | None:
    """The EM data folder: `em_data`, else $CAI_EM_DATA, else None (nothing given: the project's own data)."""
    if em_data is not None and str(em_data) != "":
        return Path(em_data).expanduser()
    env = os.environ.get(EM_DATA_ENV)
    return Path(env).expanduser() if env else None


def betley_dir(em_data: str | Path | None = None, needs: tuple[Path, ...] = (PAPER_CSV,)) -> Path:
    """The `betley/` folder of the given EM data (`em_data`, or $CAI_EM_DATA): that folder's betley/, or the
    folder itself, whichever holds `needs`. MissingInput names what was looked for and how to get it."""
    root = resolve_em_data(em_data)
    fix = "run `python bootstrap.py data fetch em-paper` (it prints the folder to pass)"
    if root is None:
        raise MissingInput(f"EM data: pass --em-data DIR (the folder holding betley/) or set {EM_DATA_ENV}; {fix}")
    if not root.is_dir():
        raise MissingInput(f"EM data: {root} does not exist or is not a folder; {fix}")
    for cand in (root / "betley", root):
        if all((cand / n).is_file() for n in needs):
            return cand
    missing = ", ".join(str(root / "betley" / n) for n in needs)
    raise MissingInput(f"EM data: {root} lacks {missing}; {fix}")


def paper_file(em_data: str | Path | None, name: Path) -> Path | None:
    """A file of the given EM data, None when no EM data was given (MissingInput when given without it)."""
    if resolve_em_data(em_data) is None:
        return None
    return betley_dir(em_data, (name,)) / name


def _digest(path: Path, h) -> str:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_blob_id(path: Path) -> str:
    """What `git hash-object` prints: sha1 over "blob <size>\\0" and the content."""
    return _digest(path, hashlib.sha1(f"blob {path.stat().st_size}\0".encode()))


def verify(path: Path, pin: Pinned) -> str | None:
    """None when the file matches its pin, else what differs."""
    if not path.is_file():
        return "missing"
    if pin.size is not None and (size := path.stat().st_size) != pin.size:
        return f"size {size}, expected {pin.size}"
    if pin.sha256 is not None and (digest := _digest(path, hashlib.sha256())) != pin.sha256:
        return f"sha256 {digest}, expected {pin.sha256}"
    if pin.git_blob is not None and (blob := git_blob_id(path)) != pin.git_blob:
        return f"git blob {blob}, expected {pin.git_blob}"
    return None


def fetch(dest: Path | None = None, base_url: str = BASE_URL, timeout_s: float = 60.0,
          on_file: Callable[[str, str], None] | None = None) -> Path:
    """Download the pinned files to `dest`/betley/ (a file already there and matching is kept, so a rerun
    after an interruption downloads only what is missing). A file is kept only when it matches its pin;
    BadInput names the file and both digests otherwise, MissingInput a file the server does not have.
    `on_file(path, "kept" | "downloaded")` reports progress. Returns dest/betley."""
    out = (dest or default_dest()).expanduser() / "betley"
    base = base_url if base_url.endswith("/") else base_url + "/"
    for pin in FILES:
        target = out / pin.path
        if verify(target, pin) is None:
            on_file and on_file(pin.path, "kept")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        url = base + pin.path
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp, atomic_file(target) as tmp:
                with tmp.open("wb") as f:
                    while block := resp.read(1 << 20):
                        f.write(block)
                if (why := verify(tmp, pin)) is not None:
                    raise BadInput(f"EM data: {url}: {why}; the file was not kept (a changed upstream file or "
                                   "a broken download: rerun, or report it if it persists)")
        except urllib.error.HTTPError as e:
            raise MissingInput(f"EM data: {url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise MissingInput(f"EM data: {url}: {e.reason} (no network? download the files by hand into "
                               f"{out} and rerun: present, matching files are kept)") from None
        on_file and on_file(pin.path, "downloaded")
    return out
