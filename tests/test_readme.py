"""Every command in the README is run by a test: here when it is cheap, elsewhere (named) when it is not.

The README's fenced shell blocks (```bash, sh, shell, console) are its commands; each line is split at `&&` into simple
commands (comments dropped, continuation lines joined). Each one is in RUN_HERE, and run for
real against a throwaway MLflow store, or in COVERED_ELSEWHERE with the test that runs it and the strings
that show it does (the command's words, or what it leaves), which that test must use.
A README command in neither fails `test_every_readme_command_is_run_here_or_named_elsewhere`.
The ```python blocks are executed against the same throwaway store.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, class_images, register_evaluated

import metaflowlib
from metaflowlib import registry
from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.methods import ProtoNet
from metaflowlib.serving.fewshot import log_pyfunc_model

README = ROOT / "README.md"
MODEL = "omniglot-vinyals-protonet"

# command -> text its output must contain (in README order: promote, then rollback)
RUN_HERE = {
    "metaflowlib models list": f"{MODEL}\n  v1 [production]  acc_5w1s 0.9000",
    f"metaflowlib models show {MODEL}": f"{MODEL} v1 aliases=['production']",
    f"metaflowlib promote {MODEL} 2": (f"promoted {MODEL} v2 to production; acc_5w1s 0.9500 vs production v1's 0.9000: "
                                       "difference +0.0500, 95% interval [+0.0400, +0.0600] (paired bootstrap over 100 shared tasks)"),
    f"metaflowlib promote {MODEL} 2 --force": f"{MODEL} version 2 is already production",
    f"metaflowlib rollback {MODEL}": f"rolled {MODEL} production back from v2 to v1",
}
# command -> the test that runs it (tests/<file>.py::<function>), and strings in that test (or the fixtures it takes)
# that show it runs the command or checks what the command leaves
PIPELINE = "tests/test_pipeline.py::test_dvc_repro_trains_evaluates_registers_and_serves"
SERVER = "tests/test_serving_http.py::test_served_model_labels_new_classes_with_the_code_it_ships"
CI = "tests/test_readme.py::test_ci_runs_the_readmes_install_and_test_commands"
PREDICT = "tests/test_cli.py::test_predict_labels_query_folders_as_text_and_json"
INSTALLED = "tests/test_readme.py::test_the_package_and_its_script_are_installed"
PAPER_RUN = "tests/test_paper_run.py::test_the_committed_plan_is_params_yaml_resolved"
PAPER_WINDOW = "tests/test_paper_run.py::test_the_window_script_carries_the_state_in_and_out_through_out"
IMPORT = "tests/test_import_run.py::test_a_finished_run_is_registered_promoted_and_reported_like_a_trained_method"
COVERED_ELSEWHERE = {
    "python bench/paper_plan.py": (PAPER_RUN, ("bench", "paper_runs", "plan.json", "params.yaml")),
    "OUT=/tmp/paper-out bash bench/paper_run.sh": (PAPER_WINDOW, ("bash", "bench/paper_run.sh", "OUT", "paper_runs")),
    "dvc repro register_import@protonet_paper_1shot": (IMPORT, ("import_run protonet_paper", "register protonet_paper")),
    "pip install torch==2.13.0": (CI, ("pip install torch==2.13.0",)),
    "pip install -e .": (INSTALLED, ("metaflowlib", "console_scripts")),
    "dvc repro": (PIPELINE, ("repro",)),
    "pip install -e '.[test]'": (CI, ("pip install -e '.[test]'",)),
    "pip install --no-deps easyfsl==1.5.0": (CI, ("pip install --no-deps easyfsl==1.5.0",)),
    "python -m pytest -q": (CI, ("python -m pytest -q",)),
    "dvc repro report": (PIPELINE, ("repro", "reports", "summary.md")),
    "dvc plots show": ("tests/test_report.py::test_dvc_plots_show_renders_every_report_plot", ("plots", "show")),
    f"MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow models serve -m models:/{MODEL}@production --env-manager local -p 5001":
        (SERVER, ("mlflow", "models", "serve", "@production", "--env-manager", "local")),
    ("curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d "
     "'{\"inputs\": {\"support_images\": [...], \"support_labels\": [...], \"query_images\": [...]}, "
     "\"params\": {\"strategy\": \"bn\"}}'"):
        (SERVER, ("/invocations", "inputs")),
    f"metaflowlib predict {MODEL} --support support/ --query query/": (PREDICT, ("predict", "--support", "--query")),
    f"metaflowlib predict {MODEL} @production --support support/ --query query/ --strategy tent --json":
        (PREDICT, ("predict", "@production", "--strategy", "tent", "--json")),
}


SHELL = "bash|sh|shell|console"


def fenced_blocks(languages: str) -> list[str]:
    """The bodies of the README's fenced blocks in one of `languages` ('a|b')."""
    return re.findall(rf"^```(?:{languages})\n(.*?)^```$", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def readme_commands() -> list[str]:
    """Every simple command of the shell blocks, normalized by shlex (so quoting style does not matter)."""
    commands = []
    for block in fenced_blocks(SHELL):
        for line in block.replace("\\\n", " ").splitlines():
            words: list[str] = []
            for word in [*shlex.split(line, comments=True), "&&"]:
                if word == "&&":
                    if words:
                        commands.append(shlex.join(words))
                    words = []
                else:
                    words.append(word)
    return commands


def test_every_readme_command_is_run_here_or_named_elsewhere():
    commands = readme_commands()
    assert len(commands) >= 10, commands  # the parser finds the README's blocks
    unknown = [c for c in commands if c not in RUN_HERE and c not in COVERED_ELSEWHERE]
    assert not unknown, f"README commands neither run in tests/test_readme.py nor mapped to a test: {unknown}"
    stale = [c for c in [*RUN_HERE, *COVERED_ELSEWHERE] if c not in commands]
    assert not stale, f"no longer in the README (remove them here): {stale}"
    assert not RUN_HERE.keys() & COVERED_ELSEWHERE.keys()


def strings_used_by(node: str) -> set[str]:
    """The string constants (f-string pieces and docstrings included) of a test function, of the same-file
    fixtures among its arguments and of the same-file functions these call; fails when the function does not exist."""
    path, name = node.split("::")
    functions = {f.name: f for f in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(f, ast.FunctionDef)}
    assert name in functions, f"{node} does not exist"
    test = functions[name]
    used, todo = [], [test, *(functions[a.arg] for a in test.args.args if a.arg in functions)]
    while todo:
        function = todo.pop()
        if function not in used:
            used.append(function)
            todo += [functions[c.func.id] for c in ast.walk(function)
                     if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in functions]
    return {c.value for f in used for c in ast.walk(f) if isinstance(c, ast.Constant) and isinstance(c.value, str)}


@pytest.mark.parametrize("command", sorted(COVERED_ELSEWHERE))
def test_the_named_test_runs_the_command(command):
    node, evidence = COVERED_ELSEWHERE[command]
    missing = [word for word in evidence if word not in strings_used_by(node)]
    assert not missing, f"{node} does not use {missing}: nothing shows it runs `{command}`"


def test_ci_runs_the_readmes_install_and_test_commands():
    """.ci/run is what runs `pip install` and `python -m pytest` for real: the README's commands, quietly."""
    def bare(command: str) -> str:  # without the interpreter prefix and the quiet flag
        words = shlex.split(command)
        words = words[2:] if words[:2] in (["python", "-m"], ["python3", "-m"]) else words
        return shlex.join(w for w in words if w != "-q")

    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = {bare(line) for line in lines if line.startswith(("python -m ", "python3 -m "))}
    for command in ("pip install torch==2.13.0", "pip install -e '.[test]'", "pip install --no-deps easyfsl==1.5.0",
                    "python -m pytest -q"):
        assert command in readme_commands() and bare(command) in ci, (command, ci)


def test_the_package_and_its_script_are_installed():
    """What `pip install -e .` leaves: the distribution at this version and its two console scripts."""
    distribution = importlib.metadata.distribution("metaflowlib")
    assert distribution.version == metaflowlib.__version__
    scripts = {e.name: e.value for e in distribution.entry_points if e.group == "console_scripts"}
    assert scripts == {"metaflowlib": "metaflowlib.cli:main", "metaflowlib-bench": "metaflowlib_bench.suite:main"}
    for script in scripts:
        assert shutil.which(script, path=str(Path(sys.executable).parent)), f"no {script} script next to this python"


@pytest.fixture
def store(tmp_path, mlflow_store):
    """The README's model name in a throwaway store, as evaluate@ and register@ leave it: v1 (acc 0.90) in
    production, v2 (acc 0.95) not."""
    for version, acc in ((1, 0.90), (2, 0.95)):
        torch.manual_seed(version)
        omega = save_meta_knowledge(ProtoNet(hidden=8), tmp_path / f"omega{version}", {"image_size": 28})
        with mlflow.start_run():
            uri = log_pyfunc_model(omega)
        register_evaluated(uri, MODEL, acc, protocol="omniglot-vinyals")  # the same 100 tasks, v2 0.05 better on average
    registry.promote(MODEL, "1", "acc_5w1s")
    return mlflow_store


def test_the_cheap_readme_commands_run_as_written(store, tmp_path):
    """In README order, as a user types them: the installed `metaflowlib` script, params.yaml in the working
    directory, the store from $MLFLOW_TRACKING_URI (this checkout first on PYTHONPATH, whatever an editable
    install points at)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = [c for c in readme_commands() if c in RUN_HERE]
    assert ran == list(RUN_HERE)  # every one, in the README's order
    for command in ran:
        done = subprocess.run(["bash", "-c", command], check=False, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert RUN_HERE[command] in done.stdout, (command, done.stdout)
    assert registry.get_alias(MODEL).version == "1"  # promoted to v2, rolled back


def test_the_python_blocks_run(store):
    images, _ = class_images(3, 3, seed=5)  # by class: the first of each class is its support image
    support, query = images[::3], np.delete(images, np.s_[::3], axis=0)
    for block in fenced_blocks("python"):
        if block == worked_example()[1]:  # a file, not a snippet: test_the_worked_example_method_trains_from_its_file
            continue
        namespace = {"mlflow": mlflow, "support": support, "labels": np.arange(3), "query": query}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        answer = namespace.get("out") or {"labels": namespace["classifier"].predict(query)}
        assert answer["labels"].shape == (len(query),)


def worked_example() -> tuple[str, str, dict]:
    """The README's new method: its module name, the file's source, and its `methods:` params block."""
    text = README.read_text()
    source = re.search(r"^`metaflowlib/methods/(\w+)\.py`:\n\n```python\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)
    block = re.search(r"^`params.yaml`:\n\n```yaml\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)
    return source.group(1), source.group(2), yaml.safe_load(block.group(1))["methods"]


def test_the_worked_example_method_trains_from_its_file(tmp_path):
    """The README's claim: one file in metaflowlib/methods/ plus a params block is a method `metaflowlib check`
    accepts and `train@<key>` trains, logs and saves (here on a tiny synthetic split and a small budget)."""
    from conftest import copy_project, project_files

    from metaflowlib.data.prepare import Split, save_splits

    name, source, methods = worked_example()
    project = tmp_path / "project"
    copy_project(project, project_files())
    (project / "metaflowlib" / "methods" / f"{name}.py").write_text(source)
    ((key, block),) = methods.items()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["methods"] = {key: {**block, "hidden": 16, "budget": {"default": {"episodes": 40}}}}  # small, same keys
    params["shift"]["methods"], params["optimizer"]["finetune"]["methods"] = [], []
    params["train"].update(val_every=20, progress="log", precision="fp32",
                           validation={"ways": 5, "shots": 1, "queries": 3, "tasks": 20})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    splits = {}
    for i, split in enumerate(("train", "val", "test")):
        images, labels = class_images(12, 20, seed=i)  # Omniglot's 20 examples per class: 1 shot + 15 queries fit
        splits[split] = Split(images, labels, [f"c{c}" for c in range(12)])
    save_splits(splits, project / "data" / "prepared", {"dataset": "synthetic"})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    check = subprocess.run([sys.executable, "-m", "metaflowlib.cli", "check"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and f"{key} ({key})" in check.stdout, check.stderr
    train = subprocess.run([sys.executable, "pipelines/train.py", key], cwd=project, env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    record = json.loads((project / "runs" / key / "train.json").read_text())
    saved = json.loads((project / "models" / key / "config.json").read_text())
    assert saved["kind"] == key and saved["config"]["hidden"] == 16 and record["meta_train_episodes"] == 40
    assert record["best_val_accuracy"] > 0.4  # 5-way: chance is 0.2
