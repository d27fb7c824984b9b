"""Browsing runs in MLflow: nested evaluation runs under the training run, and the tags that find them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import mlflow
import pytest
import torch
from conftest import class_images

from metaflowlib import evaluation_log, runtime, tracking
from metaflowlib.data.prepare import Split, save_splits
from metaflowlib.errors import MetaflowError

PARENT_ID = "mlflow.parentRunId"


def result(ways: int, shots: int, accuracy: float, digest: str) -> dict:
    return {"ways": ways, "shots": shots, "queries": 15, "episodes": 100, "accuracy": accuracy, "ci95": 0.01, "digest": digest}


def children_of(parent_id: str) -> dict[str, mlflow.entities.Run]:
    """Run name -> run of the parent's children; a name held twice fails."""
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{PARENT_ID}` = '{parent_id}'", output_format="list")
    names = [run.info.run_name for run in runs]
    assert len(names) == len(set(names)), f"duplicate nested runs: {sorted(names)}"
    return {run.info.run_name: run for run in runs}


def evaluation(training_id: str, settings: dict[str, float]) -> tuple[str, dict[str, str]]:
    """An evaluate@protonet run of `training_id` with one nested run per setting, as the stage logs it."""
    tags = {"stage": "evaluate@protonet", "evaluated_run_id": training_id}
    with mlflow.start_run(run_name="protonet-evaluate", tags=tags) as run:
        children = tracking.log_child_runs(run.info.run_id, "evaluate@protonet",
                                           {f"evaluate/{k}": (tags, {"accuracy": v}) for k, v in settings.items()})
    return run.info.run_id, children


def test_a_rerun_evaluation_supersedes_the_earlier_one_and_keeps_it(mlflow_store):
    with mlflow.start_run(run_name="protonet", tags={"method": "protonet"}) as training:
        mlflow.log_metric("meta_train_seconds", 9.0)
    other_training = mlflow.start_run(run_name="protonet").info.run_id
    mlflow.end_run()
    elsewhere, _ = evaluation(other_training, {"5w1s": 0.5})
    first, first_children = evaluation(training.info.run_id, {"5w1s": 0.9, "20w1s": 0.7})
    five = children_of(first)["evaluate/5w1s"]
    assert five.info.run_id == first_children["evaluate/5w1s"] and five.info.status == "FINISHED"
    assert five.data.tags["stage"] == "evaluate@protonet" and five.data.metrics == {"accuracy": 0.9}
    assert tracking.supersede(first, {"stage": "evaluate@protonet", "evaluated_run_id": training.info.run_id}) == []

    second, second_children = evaluation(training.info.run_id, {"5w1s": 0.95})
    tagged = tracking.supersede(second, {"stage": "evaluate@protonet", "evaluated_run_id": training.info.run_id})
    assert sorted(tagged) == sorted([first, *first_children.values()])  # the earlier run and its nested runs, nothing else
    client = mlflow.MlflowClient()
    for run_id in tagged:
        run = client.get_run(run_id)
        assert run.data.tags["superseded_by"] == second and run.info.lifecycle_stage == "active"  # history, not deleted
    for run_id in (second, *second_children.values(), elsewhere):
        assert "superseded_by" not in client.get_run(run_id).data.tags
    assert client.get_run(training.info.run_id).data.metrics == {"meta_train_seconds": 9.0}  # the training run untouched


def test_one_nested_run_per_configuration_with_the_evaluation_runs_tags():
    report = {"settings": {"5w1s": result(5, 1, 0.9, "a"), "20w5s": result(20, 5, 0.8, "b")},
              "shots_curve": {"1": result(5, 1, 0.9, "a"), "10": result(5, 10, 0.97, "c")}}  # 1 shot: the 5w1s tasks, reused
    tags = {"method": "protonet", "profile": "default", "data_digest": "d1", "device": "cpu", "stage": "evaluate@protonet"}
    children = evaluation_log.child_runs(report, tags)
    assert list(children) == ["evaluate/5w1s", "evaluate/20w5s", "evaluate/5w10s"]
    tags, metrics = children["evaluate/5w10s"]
    assert tags == {"method": "protonet", "profile": "default", "data_digest": "d1", "device": "cpu", "stage": "evaluate@protonet",
                    "setting": "5w10s", "ways": "5", "shots": "10", "queries": "15", "episodes": "100", "episodes_digest": "c"}
    assert metrics == {"accuracy": 0.97, "ci95": 0.01}
    assert children["evaluate/20w5s"][0]["episodes_digest"] == "b"


def test_a_relative_store_belongs_to_the_dvc_repository_running_the_stage(tmp_path, monkeypatch):
    """`dvc exp run --temp` runs stages in a copy that is deleted afterwards, with DVC_ROOT naming the parent
    repository: a relative SQLite store and artifact folder resolve there, and runs carry the experiment's name."""
    workspace, parent = tmp_path / "tmp-exp", tmp_path / "project"
    workspace.mkdir(), parent.mkdir()
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.resolve_store("sqlite:///mlflow.db") == f"sqlite:///{workspace / 'mlflow.db'}"
    assert tracking.run_tags() == {}
    monkeypatch.setenv("DVC_ROOT", str(parent))
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    assert tracking.resolve_store("sqlite:///mlflow.db") == f"sqlite:///{parent / 'mlflow.db'}"
    assert tracking.resolve_store("sqlite:///sub/../m.db") == f"sqlite:///{parent / 'm.db'}"
    assert tracking.resolve_store(f"sqlite:///{tmp_path / 'abs.db'}") == f"sqlite:///{tmp_path / 'abs.db'}"  # absolute: as given
    assert tracking.resolve_store("http://tracking:5000") == "http://tracking:5000"
    assert tracking.run_tags() == {"dvc_exp_name": "brisk-lark"}

    tracking.configure("sqlite:///mlflow.db")
    try:
        with tracking.start_run("exp", "mlartifacts", "r", {"stage": "train@x"}) as run:
            mlflow.log_dict({"a": 1}, "a.json")
        assert (parent / "mlflow.db").is_file() and not (workspace / "mlflow.db").exists()
        assert list(parent.glob("mlartifacts/*/artifacts/a.json")) and not (workspace / "mlartifacts").exists()
        assert mlflow.get_run(run.info.run_id).data.tags["dvc_exp_name"] == "brisk-lark"
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_system_tags_name_the_cpu_beside_the_device(monkeypatch):
    """On a GPU `device_name` is the GPU's name and `cpu_name` the host CPU's; on a CPU both name the CPU."""
    cpu = runtime.device_name(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    tags = tracking.system_tags(torch.device("cuda", 0))
    assert (tags["device"], tags["device_name"], tags["cpu_name"]) == ("cuda", "NVIDIA H100 80GB HBM3", cpu)
    assert cpu not in ("", "NVIDIA H100 80GB HBM3")
    tags = tracking.system_tags(torch.device("cpu"))
    assert (tags["device"], tags["device_name"], tags["cpu_name"]) == ("cpu", cpu, cpu)
    assert tags["torch_version"] == torch.__version__


def prepared_splits(root) -> dict[str, int]:
    """A tiny prepared folder (train/val/test of different drawings) as the prepare stage writes it; split -> rows."""
    splits = {}
    for seed, name in enumerate(("train", "val", "test")):
        images, labels = class_images(4 + seed, 3, seed=seed)
        splits[name] = Split(images, labels, [f"c{c}" for c in range(4 + seed)])
    save_splits(splits, root, {"dataset": "synthetic"})
    return {name: len(split.labels) for name, split in splits.items()}


def test_a_run_records_the_prepared_splits_it_used_and_is_found_by_their_digest(mlflow_store, tmp_path):
    prepared = tmp_path / "prepared"
    rows = prepared_splits(prepared)
    experiment = tracking.experiment_id("synthetic", str(tmp_path / "mlartifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        tracking.log_splits(prepared, {"train": "training", "val": "validation"})
        tracking.log_splits(prepared, {"train": "training"})  # a resumed run logs again: nothing is added
    with mlflow.start_run(experiment_id=experiment) as other:
        tracking.log_splits(prepared, {"val": "validation"})

    inputs = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {tag.value: item.dataset for item in inputs for tag in item.tags if tag.key == "mlflow.data.context"}
    assert len(inputs) == 2 and set(by_context) == {"training", "validation"}  # the test split was not used
    for context, split in (("training", "train"), ("validation", "val")):
        dataset = by_context[context]
        arrow = b"".join(path.read_bytes() for path in sorted((prepared / split).glob("*.arrow")))
        assert dataset.name == f"synthetic/{split}"
        assert dataset.digest == hashlib.sha256(arrow).hexdigest()[:16]
        assert (dataset.source_type, json.loads(dataset.source)) == ("local", {"uri": (prepared / split).resolve().as_uri()})
        assert json.loads(dataset.profile)["num_rows"] == rows[split]
        columns = [column["name"] for column in json.loads(dataset.schema)["mlflow_colspec"]]
        assert columns == datasets.load_from_disk(str(prepared / split)).column_names
    assert by_context["training"].digest != by_context["validation"].digest

    def found(query: str) -> set[str]:
        return {r.info.run_id for r in mlflow.search_runs([experiment], query, output_format="list")}

    assert found(f"dataset.digest = '{by_context['training'].digest}'") == {run.info.run_id}
    assert found("dataset.name = 'synthetic/val' and dataset.context = 'validation'") == {run.info.run_id, other.info.run_id}

    with pytest.raises(MetaflowError, match="none is active"):
        tracking.log_splits(prepared, {"train": "training"})  # outside a run: refused, not a stray run
    assert len(mlflow.search_runs([experiment], output_format="list")) == 2


def test_experiments_are_marked_as_machine_learning_unless_someone_chose_a_kind(mlflow_store, tmp_path):
    """The key and value the MLflow UI's experiment-kind selector writes (server/js/build, `mlflow.experimentKind`)."""
    client = mlflow.MlflowClient()
    created = tracking.experiment_id("new", str(tmp_path / "a"))
    assert client.get_experiment(created).tags.get("mlflow.experimentKind") == "custom_model_development"
    earlier = mlflow.create_experiment("earlier")  # made before the tag existed
    assert "mlflow.experimentKind" not in client.get_experiment(earlier).tags
    assert tracking.experiment_id("earlier", str(tmp_path / "b")) == earlier
    assert client.get_experiment(earlier).tags.get("mlflow.experimentKind") == "custom_model_development"
    chosen = mlflow.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert tracking.experiment_id("chosen", str(tmp_path / "c")) == chosen
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_the_ui_link_opens_the_runs_table_in_machine_learning_mode(mlflow_store):
    assert tracking.ui_link("7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert tracking.ui_link("7", "http://host:8080/") == "http://host:8080/#/experiments/7/runs?workflowType=machine_learning"
    mlflow.set_tracking_uri("http://mlflow.example:5001")
    assert tracking.ui_link("7") == "http://mlflow.example:5001/#/experiments/7/runs?workflowType=machine_learning"


def test_the_installed_mlflow_ui_has_the_route_and_the_switch_the_link_uses():
    """The link's parts as the installed UI bundle spells them, so an MLflow upgrade that renames one fails here."""
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    main = next(bundle.glob("main.*.js"), None)
    if main is None:
        pytest.skip("this MLflow install has no UI bundle")
    text = main.read_text(errors="replace")
    assert '"/experiments/:experimentId/runs"' in text
    assert 'MACHINE_LEARNING="machine_learning"' in text and 'get("workflowType")' in text
    assert '"mlflow.experimentKind"' in text and 'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"' in text
