"""A quiet console: library output (logging, warnings, C-level writes, subprocesses) goes to the log file, the
project's console and errors stay on the terminal, and the log follows the run into its directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NOISY = """
import logging, os, subprocess, sys, warnings
from cai_bootstrap.core.console import console, move_log, quiet
quiet("early.log")
logging.getLogger("vllm").warning("vllm chatter")
warnings.warn("a library warning")
os.write(2, b"c-level write\\n")
subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child process\\\\n')"], check=True)
console.print("[bold]phase one[/bold]")
move_log("runs/r1/run.log")
os.write(2, b"after the move\\n")
console.print("phase two")
"""


def test_library_output_goes_to_the_log_and_the_console_keeps_the_terminal(tmp_path):
    r = subprocess.run([sys.executable, "-c", NOISY], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.split() == ["phase", "one", "phase", "two"]  # the terminal: the project's lines only
    log = (tmp_path / "runs" / "r1" / "run.log").read_text()
    for line in ("vllm chatter", "a library warning", "c-level write", "child process", "after the move"):
        assert line in log
    assert not (tmp_path / "early.log").exists()  # moved, not copied


def test_cli_errors_reach_the_terminal_when_quiet(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bootstrap.py"), "calibrate", "--config", "nope.yaml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error: judge config nope.yaml does not exist" in r.stderr and "data/logs/judge-calibrate-" in r.stderr
    assert len(list((tmp_path / "data" / "logs").glob("judge-calibrate-*.log"))) == 1
    r = subprocess.run([sys.executable, str(ROOT / "bootstrap.py"), "--verbose", "calibrate", "--config", "nope.yaml"],
                       cwd=tmp_path / "data", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.yaml" in r.stderr and not (tmp_path / "data" / "data").exists()
