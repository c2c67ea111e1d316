"""The house foundations: the layer order of the packages, one place for paths, cache keys that survive
refactors, strict configs, and one exit-code table. Fast: no engine."""

from __future__ import annotations

import ast
import json
import re
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cai_bootstrap.core.errors import EXIT_CODES, BadInput, CaiError
from cai_bootstrap.core.io import atomic_dir, atomic_write_json, open_sqlite

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cai_bootstrap"  # the one installed name: this folder, with the rooms as its subpackages

# lowest first; a package may import only from lower layers (and itself)
LAYERS = [
    {"core"},
    {"constitution", "engine"},
    {"run"},
    {"guard"},
    {"stages", "train", "judge"},
    {"analysis"},
    {"evals"},
    {"em"},  # the EM experiment: arms, answering, judging, summary
    {"pipeline"},  # the end-to-end runs: the bootstrap loop, estimates, the demo of every phase
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in LAYER:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = ast.parse(f.read_text(), str(f))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute import, at any depth (commands import inside functions), the package
    prefix dropped: `from cai_bootstrap.judge.farm import x` is ("judge.farm", ["x"])."""
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found += [(a.name.removeprefix(PACKAGE + "."), []) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found.append((n.module.removeprefix(PACKAGE + "."), [a.name for a in n.names]))
    return found


MODULES = _modules()


def test_every_package_has_a_layer():
    pkgs = {p.parent.name for p in ROOT.glob("*/*.py")} - {"tests", "bench", ".venv"}
    assert pkgs <= set(LAYER), f"packages without a layer in this test: {pkgs - set(LAYER)}"


def test_rooms_are_imported_through_the_package_only():
    """A bare `import judge` would find the folder only where the repository is on sys.path, and load a second
    copy of the module beside `cai_bootstrap.judge`: every import of a room names the package, in tests and
    benchmarks too."""
    files = [f for f in ROOT.rglob("*.py") if not {".venv", "build"} & set(f.relative_to(ROOT).parts)]
    bad = []
    for f in files:
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module] if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module else []
            bad += [f"{f.relative_to(ROOT)}:{n.lineno} {m}" for m in names if m.split(".")[0] in {*LAYER, "bootstrap"}]
    assert not bad, bad


def test_the_package_list_names_every_folder():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    shipped = {".py", ".yaml", ".yml", ".json"}  # code, and the package data pyproject.toml ships
    folders = {PACKAGE} | {".".join((PACKAGE, *d.relative_to(ROOT).parts)) for pkg in LAYER
                           for d in [ROOT / pkg, *(ROOT / pkg).rglob("*")]
                           if d.is_dir() and any(f.suffix in shipped for f in d.iterdir())}
    assert listed == folders


def test_a_wheel_installs_one_name(tmp_path):
    """What `pip install .` puts into site-packages: `cai_bootstrap` (with the rooms, the bootstrap CLI and the
    package data) and its dist-info, nothing else."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # built from a copy: setuptools keeps build/ between builds, where a deleted module would live on
    def outputs(folder: str, names: list[str]) -> set[str]:
        top = {".git", ".venv", "build", "data", "checkpoints"} if Path(folder) == ROOT else set()
        return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=outputs)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert {n.split("/")[0] for n in names} == {PACKAGE, "cai_bootstrap-0.1.0.dist-info"}
    for shipped in ("bootstrap.py", "judge/default.yaml", "evals/data/capability_mc.json", "em/questions.yaml",
                    "train/fsdp_qlora.yaml", "analysis/questions/moral.yaml"):
        assert f"{PACKAGE}/{shipped}" in names, shipped
    assert not [n for n in names if n.startswith((f"{PACKAGE}/tests/", f"{PACKAGE}/bench/"))]


def test_no_import_runs_up_or_sideways():
    bad = []
    for mod, tree in MODULES.items():
        src = mod.split(".")[0]
        for target, _ in _imports(tree):
            dst = target.split(".")[0]
            if dst in LAYER and dst != src and LAYER[dst] >= LAYER[src]:
                bad.append(f"{mod} imports {target}")
    assert not bad, bad


def test_no_module_imports_loop():
    graph = {m: {t for t, _ in _imports(tree) if t in MODULES and t != m} for m, tree in MODULES.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return False

    loops = sorted({tuple(sorted((a, b))) for a, ts in graph.items() for b in ts if reaches(b, a)})
    assert not loops, loops


def test_no_private_name_crosses_a_package():
    bad = [f"{mod}: from {t} import {n}" for mod, tree in MODULES.items() for t, names in _imports(tree)
           for n in names if n.startswith("_") and t.split(".")[0] != mod.split(".")[0]]
    assert not bad, bad


def test_only_the_layout_names_run_paths():
    """The file names of a run's layout appear as literals in run/layout.py and nowhere else."""
    names = {"generations.sqlite", "eval_results.sqlite", "ledger.sqlite", "cache.sqlite", "report_sections",
             "em_demo", "insecure_demo.jsonl", "secure_demo.jsonl", "run.log", "em-on-top", "em-base", "stacked"}
    bad = [f"{mod}: {n.value!r}" for mod, tree in MODULES.items() if mod != "run.layout"
           for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
    assert not bad, bad


def test_layout_paths():
    from cai_bootstrap.run.layout import Layout

    lay = Layout("d", "c")
    assert lay.stage_data("p", 2) == Path("d/p/stage2") and lay.stage_adapter("p", 2) == Path("c/p/stage2")
    assert lay.parent_adapter("p", 1) is None and lay.parent_adapter("p", 3) == Path("c/p/stage2")
    # train-em and the pipeline both write here (train-em wrote checkpoints/<p>/em before)
    assert lay.em_adapter("p", "on-top") == Path("c/p/em-on-top")
    assert lay.em_adapter("base", "on-top") == Path("c/base/em-base")  # the control arm is always on the base
    assert lay.em_adapter("p+secure", "on-top", 2) == Path("c/p/secure-on-top-s2")  # the secure control of p
    assert lay.run("r").ledger == Path("d/runs/r/ledger.sqlite") and lay.generation_cache.parent == Path("d/cache")
    with pytest.raises(ValueError, match="EM mode"):
        lay.em_adapter("p", "sideways")


# ---------------------------------------------------------------- caches built before this layout still hit
def test_cache_keys_are_pinned():
    """Keys computed by the code before the io module existed: any change to the key derivation (canonical
    JSON, fields, hashing) fails here, since it would turn every cached generation and judgment into a miss."""
    from cai_bootstrap.constitution import constitution_hash, parse_constitution, principle_hash
    from cai_bootstrap.engine.cache import generation_key
    from cai_bootstrap.engine.types import Request, Sampling
    from cai_bootstrap.judge.cache import ChatRequest, cache_key

    class Fake:
        name, fingerprint = "vllm", "fp-0123"

        def render(self, r):
            return "<|user|>" + r.messages[-1]["content"]

    key = generation_key(Fake(), Request.chat("Say hi — naïve café"), Sampling(max_tokens=16, n=2, seed=3),
                         template_id="t1", extra={"principle": "Be kind ✓", "n": [1, 2.5, None]})
    assert key == "114d47fcfc2262f39d909e1c82636d035f52754b81cb38f81207cc5a07fff798"
    req = ChatRequest(messages=[{"role": "user", "content": "Rate — ✓"}], logprobs=True, top_logprobs=20)
    assert cache_key("gpt-4o", req, "em-v1") == "b481a361e1afceeaec3d61e17dbabd956c6c7cf8f1474d83ee05d37ceb1835bb"
    from test_constitution import GOOD

    c = parse_constitution(GOOD.replace("A test persona.", "A test persona — café."))
    # (re-pinned when every principle gained its `ideal`: the content changed, the derivation did not)
    assert constitution_hash(c) == "18b15e3215d7f5f2" and principle_hash(c.principles[0]) == "293b33b7fccce3c8"


# ---------------------------------------------------------------- io
def test_atomic_dir_keeps_the_old_directory_when_the_block_fails(tmp_path):
    out = tmp_path / "adapter"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "a.txt").read_text() == "old"
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp or old directory left


def test_open_sqlite_is_wal_with_one_timeout(tmp_path):
    db = open_sqlite(tmp_path / "x" / "a.sqlite", autocommit=True)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("CREATE TABLE t (v)")
    db.execute("INSERT INTO t VALUES (1)")  # autocommit: visible to another connection at once
    assert sqlite3.connect(tmp_path / "x" / "a.sqlite").execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    ro = open_sqlite(tmp_path / "x" / "a.sqlite", readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("INSERT INTO t VALUES (2)")


# ---------------------------------------------------------------- strict configs
def test_counts_come_from_a_preset_and_unknown_keys_are_named():
    from cai_bootstrap.run.config import PRESETS, counts_from

    assert counts_from("quick", '{"n_tasks": 7}').n_tasks == 7
    assert counts_from("quick", '{"n_tasks": 7}').max_tokens == PRESETS["quick"].max_tokens
    with pytest.raises(BadInput, match=r"--counts: n_task: Extra inputs are not permitted"):
        counts_from("research", '{"n_task": 4}')
    with pytest.raises(BadInput, match="--preset 'huge'"):
        counts_from("huge")
    with pytest.raises(BadInput, match="not valid JSON"):
        counts_from("research", "{n_tasks: 4}")


def test_run_config_and_profiles_forbid_unknown_keys(tmp_path):
    from cai_bootstrap.engine.models import Profile
    from cai_bootstrap.run.config import RunConfig, load_run_config, save_config

    with pytest.raises(ValueError, match="persona\n"):
        RunConfig(persona=["x"])
    with pytest.raises(ValueError, match="gpu\n"):
        Profile(name="x", source="y", gpu=2)
    cfg = RunConfig(data_root=str(tmp_path / "data"))
    path = save_config(cfg, "r1")
    assert load_run_config(path.parent) == ("r1", cfg)
    path.write_text(json.dumps({"run_id": "r1", **cfg.model_dump(), "sede": 1}))
    with pytest.raises(BadInput, match=r"config.json: sede: Extra inputs"):
        load_run_config(path.parent)


def test_judge_config_names_the_file_and_the_unknown_key(tmp_path):
    from cai_bootstrap.judge.config import load_config

    raw = yaml.safe_load((ROOT / "judge" / "default.yaml").read_text())
    raw["endpoints"][0]["rpn"] = 5
    p = tmp_path / "j.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(BadInput, match=rf"judge config {re.escape(str(p))}: endpoints.0.rpn: Extra inputs"):
        load_config(p)


def test_cli_rejects_an_unknown_count_before_any_work(tmp_path, monkeypatch):
    from cai_bootstrap import bootstrap

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(bootstrap.app, ["--stage", "1", "--counts", '{"n_task": 4}'])
    assert r.exit_code == 2, r.output
    assert "n_task" in r.output and "--counts" in r.output
    assert not (tmp_path / "data").exists()  # not even the run's config was written


# ---------------------------------------------------------------- exit codes
def test_every_error_class_carries_its_code_and_the_readme_table_matches():
    from cai_bootstrap.core import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, CaiError)]
    assert len({c.exit_code for c in classes}) == len(classes)  # one code per class
    readme = (ROOT / "README.md").read_text()
    table = dict(re.findall(r"^\| (\d) \| `?(\w+|-)`? \|", readme, re.M))
    assert {int(k): v for k, v in table.items() if v in {c.__name__ for c in classes}} == {
        c.exit_code: c.__name__ for c in classes if c is not CaiError}
    assert set(EXIT_CODES) == {int(k) for k in table}


def test_project_errors_map_to_the_table():
    from cai_bootstrap.constitution import ConstitutionError
    from cai_bootstrap.core.errors import MissingInput
    from cai_bootstrap.engine.models import ModelError
    from cai_bootstrap.engine.types import EngineError
    from cai_bootstrap.judge.config import ConfigError
    from cai_bootstrap.judge.scorers import ScorerError

    for cls in (ConstitutionError, EngineError, ConfigError, ScorerError):
        assert issubclass(cls, BadInput), cls
    assert issubclass(ModelError, MissingInput)


def test_cli_turns_a_project_error_into_its_code_and_one_line(tmp_path, monkeypatch):
    from cai_bootstrap import bootstrap

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(bootstrap.app, ["report", "nope"])
    assert r.exit_code == 2 and "error: --run 'nope'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(bootstrap.app, ["--only", "2", "--persona", "hhh"])  # stage 1 not run yet
    assert r.exit_code == 5 and "stage 2 needs the stage 1 adapter" in r.output


def test_atomic_write_json_writes_numpy_numbers_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    p = atomic_write_json(tmp_path / "a.json", {"x": np.float32(0.5), "v": np.arange(2), "p": Path("q")})
    assert json.loads(p.read_text()) == {"x": 0.5, "v": [0, 1], "p": "q"}
