"""The project copy the pipeline tests make: what git would commit, never a virtual environment (issue 17)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import ROOT, copy_project, project_files


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_venv_of_any_name_is_left_out_and_ordinary_untracked_files_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    write(root / "tracked.py", "x = 1")
    write(root / ".gitignore", "/ignored/\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    write(root / "untracked.py", "y = 2")
    write(root / "data" / "notes.txt")
    write(root / "ignored" / "big.bin")
    for venv in (root / "my env", root / "tools" / "py312"):  # names no .gitignore lists
        write(venv / "pyvenv.cfg", "home = /usr/bin\n")
        write(venv / "lib" / "site-packages" / "torch" / "__init__.py")
    write(root / "tools" / "run.sh")  # beside a venv, not in it

    listed = project_files(root)
    assert sorted(listed) == [".gitignore", "data/notes.txt", "tools/run.sh", "tracked.py", "untracked.py"]

    copy_project(tmp_path / "copy", listed, root)
    assert (tmp_path / "copy" / "untracked.py").read_text() == "y = 2"
    assert sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*") if p.is_file()) == sorted(listed)


def test_the_usual_venv_folders_are_gitignored() -> None:
    paths = [f"{name}/lib/site.py" for name in (".venv", "venv", "env", ".tox")]
    assert git(ROOT, "check-ignore", *paths).split() == paths
