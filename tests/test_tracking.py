"""Browsing runs in MLflow: nested evaluation runs under the training run, and the tags that find them."""

from __future__ import annotations

import mlflow
import torch
from conftest import load_stage

from metaflowlib import tracking

PARENT_ID = "mlflow.parentRunId"


def result(ways: int, shots: int, accuracy: float, digest: str) -> dict:
    return {"ways": ways, "shots": shots, "queries": 15, "episodes": 100, "accuracy": accuracy, "ci95": 0.01, "digest": digest}


def active_children(parent_id: str) -> dict[str, mlflow.entities.Run]:
    """Run name -> run of the parent's children that are not deleted; a name held twice fails."""
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{PARENT_ID}` = '{parent_id}'", output_format="list")
    names = [run.info.run_name for run in runs]
    assert len(names) == len(set(names)), f"duplicate nested runs: {sorted(names)}"
    return {run.info.run_name: run for run in runs}


def test_a_rerun_replaces_its_nested_runs_and_leaves_the_parent_and_other_stages_alone(mlflow_store):
    with mlflow.start_run(run_name="protonet", tags={"method": "protonet"}) as parent:
        mlflow.log_metric("acc_5w1s", 0.9)
    parent_id = parent.info.run_id
    other = tracking.replace_child_runs(parent_id, "shift@protonet", {"shift/clean": ({}, {"accuracy": 0.5})})
    first = tracking.replace_child_runs(parent_id, "evaluate@protonet", {
        "evaluate/5w1s": ({"setting": "5w1s"}, {"accuracy": 0.9, "ci95": 0.01}),
        "evaluate/20w1s": ({"setting": "20w1s"}, {"accuracy": 0.7, "ci95": 0.02})})
    children = active_children(parent_id)
    assert set(children) == {"shift/clean", "evaluate/5w1s", "evaluate/20w1s"}
    five = children["evaluate/5w1s"]
    assert five.info.run_id == first["evaluate/5w1s"] and five.info.status == "FINISHED"
    assert five.info.experiment_id == parent.info.experiment_id
    assert five.data.tags["stage"] == "evaluate@protonet" and five.data.metrics == {"accuracy": 0.9, "ci95": 0.01}

    second = tracking.replace_child_runs(parent_id, "evaluate@protonet", {"evaluate/5w1s": ({"setting": "5w1s"}, {"accuracy": 0.95})})
    children = active_children(parent_id)
    assert set(children) == {"shift/clean", "evaluate/5w1s"}  # 20w1s is gone: the set is the latest evaluation's
    assert children["evaluate/5w1s"].info.run_id == second["evaluate/5w1s"] != first["evaluate/5w1s"]
    assert children["shift/clean"].info.run_id == other["shift/clean"]
    client = mlflow.MlflowClient()
    assert {client.get_run(run_id).info.lifecycle_stage for run_id in first.values()} == {"deleted"}  # restorable, not purged
    assert client.get_run(parent_id).data.metrics == {"acc_5w1s": 0.9}


def test_one_nested_run_per_configuration_with_the_training_runs_tags():
    evaluate = load_stage("evaluate")
    report = {"settings": {"5w1s": result(5, 1, 0.9, "a"), "20w5s": result(20, 5, 0.8, "b")},
              "shots_curve": {"1": result(5, 1, 0.9, "a"), "10": result(5, 10, 0.97, "c")}}  # 1 shot: the 5w1s tasks, reused
    parent_tags = {"method": "protonet", "profile": "default", "data_digest": "d1", "device": "cuda", "stage": "train@protonet",
                   "mlflow.runName": "protonet", "evaluated": "true", "episodes_digest_5w1s": "a"}
    children = evaluate.child_runs(report, parent_tags, {"device": "cpu"})
    assert list(children) == ["evaluate/5w1s", "evaluate/20w5s", "evaluate/5w10s"]
    tags, metrics = children["evaluate/5w10s"]
    assert tags == {"method": "protonet", "profile": "default", "data_digest": "d1", "device": "cpu", "stage": "train@protonet",
                    "setting": "5w10s", "ways": "5", "shots": "10", "queries": "15", "episodes": "100", "episodes_digest": "c"}
    assert metrics == {"accuracy": 0.97, "ci95": 0.01}
    assert children["evaluate/20w5s"][0]["episodes_digest"] == "b"


def test_system_tags_name_the_cpu_beside_the_device():
    tags = tracking.system_tags(torch.device("cpu"))
    assert tags["device"] == "cpu" and tags["cpu_name"] == tags["device_name"] != ""
    assert tags["torch_version"] == torch.__version__
