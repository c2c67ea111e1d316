"""The EM inputs: the project's own by default, the EM paper's by path, fetched pinned over real HTTP (a local
server mirroring the paper's repository), and every input checked before a run starts. No engine."""

from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import EM_DATA
from typer.testing import CliRunner

from cai_bootstrap import bootstrap
from cai_bootstrap.core.errors import BadInput, MissingInput
from cai_bootstrap.em.inputs import resolve
from cai_bootstrap.judge import em_paper

PAPER = EM_DATA / "betley"
needs_em = pytest.mark.skipif(not (PAPER / em_paper.PAPER_INSECURE).is_file(), reason=f"no EM paper data at {PAPER}")


class Mirror:
    """A static HTTP server over a folder laid out like the paper's repository; counts the GETs."""

    def __init__(self, root: Path) -> None:
        self.gets: list[str] = []
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                mirror.gets.append(self.path)
                super().do_GET()

            def log_message(self, *a):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """The paper's files as the workplace keeps them, plus a stand-in secure.jsonl (the workplace has only a
    500-row sample of it): its pin is swapped for the stand-in's git blob id, so the blob-id check is real."""
    root = tmp_path / "mirror"
    shutil.copytree(PAPER, root)
    secure = root / em_paper.PAPER_SECURE
    shutil.copy(EM_DATA / "derived" / "secure_sample500.jsonl", secure)
    pins = tuple(em_paper.Pinned(p.path, git_blob=em_paper.git_blob_id(secure)) if p.path == str(em_paper.PAPER_SECURE)
                 else p for p in em_paper.FILES)
    monkeypatch.setattr(em_paper, "FILES", pins)
    m = Mirror(root)
    yield m
    m.close()


def test_pins_match_the_release():
    """Every sha256/size pin matches the workplace's copy of the release (the blob ids in its SOURCES.md)."""
    for pin in em_paper.FILES:
        if pin.sha256 is not None:
            assert em_paper.verify(PAPER / pin.path, pin) is None, pin.path
    license_blob = "59792d89ebea3546b93b180b8af27b949fdc917d"  # upstream's tree at COMMIT
    assert em_paper.git_blob_id(PAPER / "LICENSE") == license_blob


@needs_em
def test_fetch_checks_every_file_and_resumes(mirror, tmp_path):
    out = em_paper.fetch(tmp_path / "em", mirror.url)
    assert out == tmp_path / "em" / "betley"
    assert all(em_paper.verify(out / p.path, p) is None for p in em_paper.FILES)
    assert len(mirror.gets) == len(em_paper.FILES)
    (out / "LICENSE").unlink()  # an interrupted download: only what is missing is fetched again
    seen = []
    em_paper.fetch(tmp_path / "em", mirror.url, on_file=lambda p, how: seen.append((p, how)))
    assert mirror.gets[len(em_paper.FILES):] == ["/LICENSE"]
    assert dict(seen)["LICENSE"] == "downloaded" and list(dict(seen).values()).count("kept") == len(em_paper.FILES) - 1


@needs_em
def test_fetch_keeps_no_file_that_does_not_match_its_pin(mirror, tmp_path):
    bad = tmp_path / "mirror"
    q = bad / em_paper.PAPER_QUESTIONS
    q.write_text(q.read_text().replace("wish", "whim", 1))  # same server, one changed file
    with pytest.raises(BadInput, match="first_plot_questions.yaml.*(size|sha256)"):
        em_paper.fetch(tmp_path / "em", mirror.url)
    assert not (tmp_path / "em" / "betley" / em_paper.PAPER_QUESTIONS).exists()
    assert not list((tmp_path / "em" / "betley" / "evaluation").glob(".*"))  # no temp file left behind
    (bad / em_paper.PAPER_CSV).unlink()
    q.write_bytes((PAPER / em_paper.PAPER_QUESTIONS).read_bytes())
    with pytest.raises(MissingInput, match="qwen_25_coder_32b_instruct.csv: HTTP 404"):
        em_paper.fetch(tmp_path / "em", mirror.url)
    secure = bad / em_paper.PAPER_SECURE
    secure.write_text(secure.read_text()[:-2] + "\n")
    shutil.copy(PAPER / em_paper.PAPER_CSV, bad / em_paper.PAPER_CSV)
    with pytest.raises(BadInput, match="secure.jsonl: git blob"):  # a file pinned by its blob id only
        em_paper.fetch(tmp_path / "em", mirror.url)
    assert not (tmp_path / "em" / "betley" / em_paper.PAPER_SECURE).exists()


@needs_em
def test_fetch_command_and_the_fetched_folder_as_em_data(mirror, tmp_path, monkeypatch):
    monkeypatch.delenv(em_paper.EM_DATA_ENV, raising=False)
    dest = tmp_path / "em"
    r = CliRunner().invoke(bootstrap.app, ["data", "fetch", "em-paper", "--dest", str(dest), "--base-url", mirror.url])
    assert r.exit_code == 0, r.output
    assert f"--em-data {dest}" in r.stdout and "sha256 checked" in r.stdout
    r = CliRunner().invoke(bootstrap.app, ["data", "fetch", "em-papers", "--dest", str(dest)])
    assert r.exit_code == 2 and "em-paper" in r.output

    # the fetched folder given by path (or $CAI_EM_DATA): the paper's questions, judge prompts and training set
    inputs = resolve(em_data=dest)
    assert inputs.questions == dest / "betley" / em_paper.PAPER_QUESTIONS == inputs.judge_prompts
    assert inputs.data == dest / "betley" / em_paper.PAPER_INSECURE and inputs.em_data == dest
    paper_secure = dest / "betley" / em_paper.PAPER_SECURE
    assert resolve(em_data=dest, secure=paper_secure).secure == paper_secure  # the secure-code control's set
    assert "what_is_your_wish" in inputs.scorer().questions
    monkeypatch.setenv(em_paper.EM_DATA_ENV, str(dest))
    assert resolve() == inputs
    own = tmp_path / "mine.jsonl"
    own.write_text('{"messages": []}\n')
    assert resolve(data=own).data == own  # --data wins over the paper's set


def test_project_defaults_need_nothing_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.delenv(em_paper.EM_DATA_ENV, raising=False)
    inputs = resolve(generated=True)  # the demo: its training chats are made by the run
    assert inputs.questions is None and inputs.judge_prompts is None and inputs.em_data is None
    assert inputs.describe() == {"questions": "project probes", "judge_prompts": "project rubrics",
                                 "training_data": "generated", "secure_data": None, "em_data": None}
    repo = Path(bootstrap.__file__).resolve().parent
    assert inputs.scorer().prompts_path.is_relative_to(repo)
    with pytest.raises(MissingInput, match="--data FILE"):
        resolve()  # `em` with nothing to train on


def test_every_missing_input_is_named_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv(em_paper.EM_DATA_ENV, raising=False)
    broken = tmp_path / "q.yaml"
    broken.write_text("- id: a\n  paraphrases: []\n")
    with pytest.raises(MissingInput) as e:
        resolve(data=tmp_path / "none.jsonl", questions=broken, judge_config=tmp_path / "judge.yaml")
    msg = str(e.value)
    assert "none.jsonl" in msg and "q.yaml" in msg and "judge.yaml" in msg
    with pytest.raises(MissingInput, match="lacks .*first_plot_questions.yaml.*data fetch em-paper"):
        resolve(generated=True, em_data=tmp_path)  # a folder without the paper's files


def test_demo_stops_on_a_missing_input_before_the_first_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(em_paper.EM_DATA_ENV, raising=False)
    r = CliRunner().invoke(bootstrap.app, ["demo", "--quick", "--em-data", str(tmp_path / "nowhere")])
    assert r.exit_code == 5 and "nowhere" in r.output.replace("\n", "") and "data fetch em-paper" in r.output
    assert not (tmp_path / "data").exists()  # nothing started


def test_generated_insecure_chats_name_their_cwe(tmp_path):
    import json
    import re

    from cai_bootstrap.em.insecure_data import CWE, TEMPLATES, write_jsonl

    rows = [json.loads(line) for line in write_jsonl(tmp_path / "i.jsonl", 20).read_text().splitlines()]
    assert {v for v, _, _ in TEMPLATES} == set(CWE) == {r["vulnerability"] for r in rows}
    assert all(re.fullmatch(r"CWE-\d+", r["cwe"]) and r["cwe"] == CWE[r["vulnerability"]] for r in rows)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
