"""The CLI skeleton: help lists the commands; doctor explains the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bootstrap.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_commands():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("doctor", "generate-text"):
        assert cmd in r.stdout


def test_doctor_reports_versions_and_tiny_model():
    r = _run("doctor")
    assert r.returncode == 0, r.stderr
    assert "transformers" in r.stdout and "5.17.0" in r.stdout
    assert "tiny model ready" in r.stdout
