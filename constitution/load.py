"""Load and validate constitution YAML files; hash constitutions and principles.

Errors name the file, the YAML line (from the composed node tree, which keeps source marks that
`yaml.safe_load` throws away) and the field, e.g. `hhh.yaml:42: principles[3].critique: must not be empty`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from cai_bootstrap.constitution.schema import Constitution, Principle
from cai_bootstrap.core.errors import BadInput
from cai_bootstrap.core.io import sha256_json

CONSTITUTION_DIR = Path(__file__).resolve().parent
DEFAULT = "hhh"


class ConstitutionError(BadInput):
    """A constitution file is malformed; `file`, `line` (1-based, or None) and `field` say where."""

    def __init__(self, file: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field, self.message = str(file), line, field, message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {field + ': ' if field else ''}{message}")


def available() -> list[str]:
    return sorted(p.stem for p in CONSTITUTION_DIR.glob("*.yaml"))


def resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        if not p.is_file():
            raise ConstitutionError(p, "no such constitution file")
        return p
    path = CONSTITUTION_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConstitutionError(path, f"unknown constitution {name_or_path!r}; shipped: {', '.join(available())}")
    return path


def load_constitution(name_or_path: str | Path = DEFAULT) -> Constitution:
    """A shipped name (`hhh`, `goodness`, `sycophancy`, `misalignment`) or a path to a YAML file."""
    path = resolve(name_or_path)
    return parse_constitution(path.read_text(encoding="utf-8"), path)


def parse_constitution(text: str, file: str | Path = "<string>") -> Constitution:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConstitutionError(file, f"bad YAML: {getattr(e, 'problem', None) or e}", line=line) from e
    if not isinstance(data, dict):
        raise ConstitutionError(file, "the top level must be a mapping (name, description, version, principles)",
                                line=node.start_mark.line + 1 if node is not None else None)
    _check_duplicate_ids(data, node, file)
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        field = _dotted(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing required field"
        raise ConstitutionError(file, msg, line=_line(node, loc), field=field) from e


def _check_duplicate_ids(data: dict, node, file) -> None:
    principles = data.get("principles")
    if not isinstance(principles, list):
        return
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        pid = p.get("id") if isinstance(p, dict) else None
        if not isinstance(pid, str):
            continue
        if pid in seen:
            raise ConstitutionError(file, f"duplicate principle id {pid!r} (first at principles[{seen[pid]}])",
                                    line=_line(node, ("principles", i, "id")), field=f"principles[{i}].id")
        seen[pid] = i


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(node, loc: tuple) -> int | None:
    """The 1-based line of the deepest node along `loc` (the parent's line for a missing key)."""
    if node is None:
        return None
    best = node.start_mark.line + 1
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == part:
                    nxt = v if not isinstance(v, yaml.ScalarNode) else v
                    best = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
            best = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return best


def constitution_hash(c: Constitution) -> str:
    """Changes whenever anything a generation could see changes (principles, description, demos)."""
    return sha256_json(c.model_dump(mode="json"))[:16]


def principle_hash(p: Principle, fields: tuple[str, ...] | None = None) -> str:
    """Content hash of one principle, or of its id and the `fields` a step reads (`stages.specs.PRINCIPLE_FIELDS`):
    part of every score/critique/revision cache key that used it, so an edit regenerates only the steps that
    read what changed."""
    data = p.model_dump(mode="json")
    return sha256_json(data if fields is None else {k: data.get(k) for k in ("id", *fields)})[:16]


def dump_constitution(c: Constitution) -> str:
    """YAML stored beside generated data so `diff` can compare against what the data was made from."""
    return yaml.safe_dump(c.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True,
                          width=100)
