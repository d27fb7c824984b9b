"""Every stage depends on the code it runs, and only on it.

DVC reruns a stage when one of its deps changes. A stage script's code deps are exactly
the project files it can import (statically, including imports inside functions): a
missing one would keep stale results after a code change, an extra one reruns a stage
for code it never runs (a change to the LSTM optimizer must not retrain every
meta-learner). A folder stands for its files when the stage imports all of them.

After moving code, `python tests/test_dvc_deps.py --write` rewrites the code deps of
dvc.yaml from the imports (comments and every other entry kept).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT  # noqa: E402

CODE = ("metaflowlib/", "pipelines/", "bench/metaflowlib_bench/")


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
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_name" \
                    and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).endswith(".py"):
                todo.append(path.with_name(node.args[0].value))  # code handed to MLflow by path (models from code)
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                if (ROOT / "pipelines" / f"{name}.py").is_file():  # a stage script's sibling (_stage, production)
                    todo.append(ROOT / "pipelines" / f"{name}.py")
                elif name.split(".")[0] == "metaflowlib":
                    todo += module_files(name)
    return seen


def code_deps(script: Path) -> list[str]:
    """The script's import closure as dvc.yaml deps: a folder when every .py file below it is imported."""
    code = {p.relative_to(ROOT) for p in import_closure(script) if p.suffix == ".py"}
    folders = {parent for p in code for parent in p.parents if parent not in (Path("."), Path("metaflowlib"), Path("pipelines"))}
    covered = {f for f in folders if all(p.relative_to(ROOT) in code for p in (ROOT / f).rglob("*.py"))}
    tops = {f for f in covered if not any(parent in covered for parent in f.parents)}
    files = {p for p in code if not any(parent in tops for parent in p.parents)}
    return sorted(str(p) for p in tops | files)


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def script_of(stage: dict) -> Path:
    body = stage.get("do", stage)
    return ROOT / body["cmd"].split()[1]


def listed_code(stage: dict) -> list[str]:
    return [d for d in stage.get("do", stage).get("deps", []) if d.startswith(CODE)]


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_code_deps_are_exactly_what_it_imports(name: str) -> None:
    stage = stages()[name]
    listed, imported = set(listed_code(stage)), set(code_deps(script_of(stage)))
    assert not imported - listed, f"stage {name} imports code it does not list in dvc.yaml deps: {sorted(imported - listed)}"
    assert not listed - imported, f"stage {name} depends on code it never imports: {sorted(listed - imported)}"


def test_a_change_to_the_learned_optimizer_reruns_only_its_own_stages() -> None:
    own = {"optimizer_train", "optimizer_eval", "optimizer_finetune", "production_optimizer", "tta", "report"}
    touched = {name for name, stage in stages().items() if not stage.get("do", stage).get("always_changed")  # rerun anyway: the watchers
               and any(d.startswith("metaflowlib/learned_optimizer") for d in listed_code(stage))}
    assert touched and touched <= own, sorted(touched - own)


def test_meta_learning_stages_do_not_depend_on_test_time_adaptation_code() -> None:
    for name in ("prepare", "pretrain", "train", "evaluate", "register"):
        deps = listed_code(stages()[name])
        assert not any(d.startswith(("metaflowlib/tta", "metaflowlib/learned_optimizer", "bench/")) for d in deps), name


def test_prepare_depends_on_no_tracking_or_registry_code() -> None:
    deps = listed_code(stages()["prepare"])
    assert not any(d.startswith(("metaflowlib/tracking", "metaflowlib/registry", "metaflowlib/serving")) for d in deps), deps


def write_code_deps() -> None:
    """Rewrite each stage's code deps in dvc.yaml from its imports: the script first, then the other deps as listed."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.indent(mapping=2, sequence=4, offset=2)
    yaml_rt.width = 4096
    path = ROOT / "dvc.yaml"
    document = yaml_rt.load(path.read_text())
    for stage in document["stages"].values():
        body = stage.get("do", stage)
        script = body["cmd"].split()[1]
        deps = body["deps"]
        comments = {deps[i]: comment for i, comment in deps.ca.items.items()}
        others = [d for d in deps if not d.startswith(CODE)]
        wanted = [script, *others, *(d for d in code_deps(ROOT / script) if d != script)]
        deps.clear()
        deps.ca.items.clear()
        deps.extend(wanted)
        for i, d in enumerate(wanted):
            if d in comments:
                deps.ca.items[i] = comments[d]
    with path.open("w") as handle:
        yaml_rt.dump(document, handle)


MLFLOW_WRITES = ("tracking.stage_run(", "tracking.start_run(", "mlflow.start_run(", "registry.register(", "registry.promote")


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


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    write_code_deps()
