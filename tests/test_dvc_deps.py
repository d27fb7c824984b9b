"""Every stage depends on the code it runs, and only on it.

DVC reruns a stage when one of its deps changes. A stage script's deps must
cover every metaflowlib module it can import (statically, including imports
inside functions), or DVC would keep stale results after a code change; they
list modules rather than the whole package so that, say, a change to the
test-time-adaptation code does not retrain every meta-learner.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT


def module_files(name: str) -> list[Path]:
    """The files importing `name` executes: each package's __init__ on the way, then the module."""
    files, parts = [], name.split(".")
    for i in range(1, len(parts) + 1):
        base = ROOT.joinpath(*parts[:i])
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                files.append(candidate)
    return files


def import_closure(script: Path) -> set[Path]:
    """The script and every project file reachable from it through import statements."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                if name == "_stage":
                    todo.append(ROOT / "pipelines" / "_stage.py")
                elif name.split(".")[0] == "metaflowlib":
                    todo += module_files(name)
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def script_of(stage: dict) -> Path:
    body = stage.get("do", stage)
    return ROOT / body["cmd"].split()[1]


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_cover_the_code_it_imports(name: str) -> None:
    stage = stages()[name]
    deps = [ROOT / d.split("$")[0].rstrip("/") for d in stage.get("do", stage).get("deps", []) if not d.startswith(("data/", "models/", "runs/", "metrics", "pretrained/", "registry/"))]
    code = {p for p in import_closure(script_of(stage)) if p.suffix == ".py"}
    uncovered = sorted(str(p.relative_to(ROOT)) for p in code if not any(p == d or d in p.parents for d in deps))
    assert not uncovered, f"stage {name} imports code it does not list in dvc.yaml deps: {uncovered}"


def test_meta_learning_stages_do_not_depend_on_test_time_adaptation_code() -> None:
    for name in ("prepare", "pretrain", "train", "evaluate", "register"):
        stage = stages()[name]
        deps = stage.get("do", stage)["deps"]
        assert "metaflowlib" not in deps and not any(d.startswith(("metaflowlib/adaptation", "metaflowlib/tta")) for d in deps), name
