"""import@<key> and register_import@<key>: a paper run from bench/paper_run.py becomes a registered, promoted, reported
training run of the pipeline, through the real stage scripts; unfinished runs and runs scored on other tasks are
refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import ROOT, load_stage, save_synthetic_prepared
from test_paper_run import SPEC
from test_rgb_pipeline import DRIVER

sys.path.insert(0, str(ROOT / "bench"))
from metaflowlib_bench.cases import write_pools  # noqa: E402

EVALUATE = {"tasks": 6, "queries": 2, "settings": ["3w1s"], "shots_curve": [], "timing_tasks": 2, "batch_tasks": 3, "seed": 2017}
RUN = {**SPEC, "evaluate": {"settings": {"3w1s": [3, 1]}, "tasks": 6, "queries": 2, "seed": 2017, "batch_tasks": 3, "timing_tasks": 2}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from metaflowlib.data.store import load_split

    root = tmp_path_factory.mktemp("import")
    shutil.copytree(ROOT / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["methods"] = {"protonet": {"kind": "protonet", "hidden": 8, "ways": 3, "shots": 1, "queries": 2,
                                      "budget": {"default": {"episodes": 3}}}}
    params["paper_runs"] = {"protonet_paper": {"run": "paper/protonet-tiny"}}
    params["train"].update(val_every=3, progress="log", validation={"ways": 3, "shots": 1, "queries": 2, "tasks": 4})
    params["evaluate"].update(EVALUATE)
    params["registry"]["gate_metric"] = "acc_3w1s"
    params["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    params["shift"]["methods"] = []
    params["optimizer"]["finetune"]["methods"] = []
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    save_synthetic_prepared(root / "data" / "prepared", 8, 6)
    arrays = {}
    for split in ("train", "val", "test"):  # the paper run's pools: the prepared splits, in the harness's layout
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = load_split(root / "data" / "prepared", split)
    write_pools(root / "pools.npz", arrays, "prepared")
    (root / "plan.json").write_text(json.dumps({"runs": [RUN]}))
    return root


def paper_run(root: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "paper_run.py"), "--plan", "plan.json", "--pools", "pools.npz",
                           "--runs-dir", "paper", "--device", "cpu", "--precision", "fp32", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def stages(root: Path, *names: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", DRIVER, *names], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_an_unfinished_run_is_refused_with_what_to_do(project):
    paper_run(project, "--segment-episodes", "2")
    refused = stages(project, "import_run protonet_paper")
    assert refused.returncode != 0
    assert "protonet-tiny is training at episode 2/7: continue it with bench/paper_run.sh" in refused.stderr
    assert not (project / "runs" / "protonet_paper").exists()


def test_a_finished_run_is_registered_promoted_and_reported_like_a_trained_method(project):
    paper_run(project)
    done = stages(project, "import_run protonet_paper", "register protonet_paper", "train protonet", "evaluate protonet")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "register@protonet_paper: omniglot-vinyals-protonet_paper version 1; promoted" in done.stdout

    scored = json.loads((project / "paper" / "protonet-tiny" / "evaluation.json").read_text())["settings"]["3w1s"]
    metrics = json.loads((project / "metrics" / "protonet_paper" / "eval.json").read_text())
    assert metrics["acc_3w1s"] == scored["accuracy"] and metrics["episodes_digest"]["3w1s"] == scored["digest"]
    assert metrics["episodes_digest"] == json.loads((project / "metrics" / "protonet" / "eval.json").read_text())["episodes_digest"]
    train = json.loads((project / "runs" / "protonet_paper" / "train.json").read_text())
    assert train["meta_train_episodes"] == 7 and train["segments"] == 2 and train["method"] == "protonet"

    store = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    client = mlflow.MlflowClient(store, store)
    run = client.get_run(train["run_id"])
    assert run.data.tags["paper_run"] == "protonet-tiny" and run.data.tags["segments"] == "2"
    assert run.data.tags["cards"] and run.data.tags["mixed_cards"] == "false" and run.data.tags["profile"] == "full"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [3, 6, 7]
    version = client.get_model_version_by_alias("omniglot-vinyals-protonet_paper", "production")
    assert version.tags["paper_run"] == "protonet-tiny" and version.tags["segments"] == "2"
    loaded = mlflow.pyfunc.load_model("models:/omniglot-vinyals-protonet_paper@production")
    assert loaded.metadata.run_id == train["run_id"]

    report = load_stage("report")
    from metaflowlib.config import load_params

    records = report.method_records(load_params(project / "params.yaml"), project)
    assert [(r.key, r.kind) for r in records] == [("protonet", "protonet"), ("protonet_paper", "protonet")]
    assert records[1].config["hidden"] == 8 and records[1].curves


def test_a_run_scored_on_other_tasks_is_refused(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["seed"] = 7
    other = tmp_path / "other"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "runs", "metrics", "models"))
    params["mlflow"]["tracking_uri"] = f"sqlite:///{other / 'mlflow.db'}"
    (other / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    refused = stages(other, "import_run protonet_paper")
    assert refused.returncode != 0
    assert "paper_runs.protonet_paper: its 3w1s evaluation was scored on other tasks than this pipeline's" in refused.stderr
