"""A DVC remote shares stage outputs: `dvc push` from one checkout, `dvc pull` into another gives the same bytes.

A throwaway git + DVC repository with one stage shaped like `prepare` (a directory
output, as data/prepared) and a local-directory remote, as in docs/team.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PREPARE = """
import json, random
from pathlib import Path
out = Path("data/prepared")
(out / "train").mkdir(parents=True)
(out / "train" / "data-00000-of-00001.arrow").write_bytes(random.Random(0).randbytes(200_000))
(out / "info.json").write_text(json.dumps({"classes": {"train": 12}}))
"""

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1",
       "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
       "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def run(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """`git ...` or `dvc ...` (this interpreter's DVC) in `cwd`; fails the test with the output unless `ok` is False."""
    command = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    if ok and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A committed repository whose `prepare` stage has run, with a local-directory remote as default."""
    repo = tmp_path / "project"
    repo.mkdir()
    run(repo, "git", "-c", "init.defaultBranch=main", "init", "-q")
    run(repo, "dvc", "init", "-q")
    (repo / "prepare.py").write_text(PREPARE)
    run(repo, "dvc", "stage", "add", "-q", "-n", "prepare", "-d", "prepare.py", "-o", "data/prepared", f"{sys.executable} prepare.py")
    run(repo, "dvc", "repro", "-q")
    run(repo, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "prepare stage and remote")
    return repo


def test_push_then_pull_restores_identical_outputs_here_and_in_a_fresh_clone(project, tmp_path):
    prepared = files(project / "data" / "prepared")
    assert len(prepared) == 2

    colleague = tmp_path / "colleague"
    run(tmp_path, "git", "clone", "-q", str(project), str(colleague))
    before = run(colleague, "dvc", "pull", ok=False)
    assert before.returncode != 0 and "Missing cache files" in before.stderr  # nothing pushed yet
    assert not (colleague / "data" / "prepared").exists()

    run(project, "dvc", "push", "-q")
    assert any((tmp_path / "remote").rglob("*"))

    # the same checkout, its cache and output gone
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data" / "prepared")
    run(project, "dvc", "pull", "-q")
    assert files(project / "data" / "prepared") == prepared

    # another checkout that never ran the stage: pull gives the same bytes, and the stage counts as up to date
    run(colleague, "dvc", "pull", "-q")
    assert files(colleague / "data" / "prepared") == prepared
    assert "up to date" in run(colleague, "dvc", "status").stdout
