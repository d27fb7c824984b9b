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
    deps = [ROOT / d.split("$")[0].rstrip("/") for d in stage.get("do", stage).get("deps", []) if not d.startswith(("data/", "models/", "runs/", "metrics", "pretrained/", "registry", "production/"))]
    code = {p for p in import_closure(script_of(stage)) if p.suffix == ".py"}
    uncovered = sorted(str(p.relative_to(ROOT)) for p in code if not any(p == d or d in p.parents for d in deps))
    assert not uncovered, f"stage {name} imports code it does not list in dvc.yaml deps: {uncovered}"


def test_meta_learning_stages_do_not_depend_on_test_time_adaptation_code() -> None:
    for name in ("prepare", "pretrain", "train", "evaluate", "register"):
        stage = stages()[name]
        deps = stage.get("do", stage)["deps"]
        assert "metaflowlib" not in deps and not any(d.startswith(("metaflowlib/adaptation", "metaflowlib/tta")) for d in deps), name


MLFLOW_WRITES = ("tracking.start_run(", "mlflow.start_run(", "registry.register(", "registry.promote")


def test_stages_that_write_to_mlflow_are_never_restored_from_the_run_cache() -> None:
    """DVC's `Stage.run` saves a run-cache entry unless the stage has an uncached output that is neither a metric
    nor a plot; with one, a param set back to an earlier value restores the outputs without running the stage,
    and its MLflow run (or registry version) never happens. Every stage whose script writes to MLflow needs such
    an output, or to be always_changed."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        checked = []
        for stage in repo.index.stages:
            if not any(marker in (ROOT / stage.cmd.split()[1]).read_text() for marker in MLFLOW_WRITES):
                continue
            checked.append(stage.addressing)
            no_cache_outs = any(not out.use_cache for out in stage.outs if not (out.is_metric or out.is_plot))
            assert stage.always_changed or no_cache_outs, f"{stage.addressing} writes to MLflow but DVC's run cache can restore it"
    assert {"train@protonet", "evaluate@protonet", "register@protonet", "shift@protonet", "optimizer_finetune", "tta@tent"} <= set(checked)
