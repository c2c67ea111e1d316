"""The CLI skeleton: commands by noun, each with an example; the flat names from before still work; doctor
explains the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bootstrap.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _commands():
    import typer
    from typer.core import TyperGroup

    from cai_bootstrap import bootstrap

    def walk(cmd, path):
        yield path, cmd
        if isinstance(cmd, TyperGroup):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(bootstrap.app), []))


def test_commands_by_noun_each_with_an_example():
    from typer.testing import CliRunner

    from cai_bootstrap import bootstrap

    commands = _commands()
    nouns = {p[0] for p, _ in commands if len(p) == 2}
    assert nouns == {"stage", "em", "judge", "guard", "model", "data"}
    assert len([p for p, _ in commands if len(p) == 1]) == 6 + len(nouns)  # 17 flat commands before: 12 now
    for path, _ in commands:
        r = CliRunner().invoke(bootstrap.app, [*path, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (path, r.output)
        assert "Example: python bootstrap.py" in r.output, path
    r = CliRunner().invoke(bootstrap.app, ["--help"], env={"COLUMNS": "200"})
    assert "Start here" in r.output and "diff" in r.output  # the flat names are named in the epilog


def test_flat_names_and_default_verbs_resolve_to_the_noun_commands():
    from typer.testing import CliRunner

    from cai_bootstrap import bootstrap
    from cai_bootstrap.core.errors import MissingInput

    for flat, noun in bootstrap.SHORTCUTS.items():
        r = CliRunner().invoke(bootstrap.app, [flat, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and f"Usage: root {noun} " in r.output, (flat, r.output)
    for args, usage in [(["judge", "in.jsonl", "--out", "x", "--help"], "judge run"),
                        (["em", "--persona", "goodness", "--help"], "em run"), (["em", "--help"], "em [OPTIONS]")]:
        r = CliRunner().invoke(bootstrap.app, args, env={"COLUMNS": "200"})
        assert f"Usage: root {usage}" in r.output, (args, r.output)
    r = CliRunner().invoke(bootstrap.app, ["em", "rescor"])  # a mistyped verb is named, not run as `em run`
    assert r.exit_code == 2 and "Did you mean 'rescore'?" in r.output
    r = CliRunner().invoke(bootstrap.app, ["em"], env={"CAI_EM_DATA": ""})  # `em` alone is `em run`, as before
    assert r.exit_code == MissingInput.exit_code and "EM training data: pass --data FILE" in r.output
    assert bootstrap.QUIET <= {" ".join(p) for p, _ in _commands()}  # every quiet name is a command


def test_doctor_reports_versions_and_tiny_model():
    r = _run("doctor")
    assert r.returncode == 0, r.stderr
    assert "transformers" in r.stdout and "5.17.0" in r.stdout
    assert "tiny model ready" in r.stdout
