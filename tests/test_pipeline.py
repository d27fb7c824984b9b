"""The real pipeline, end to end, on the real Omniglot data at a tiny budget (about 7 minutes on 2 quiet cores)."""

import json
import os
import re
import subprocess

import mlflow
import numpy as np
import pytest
import yaml
from conftest import copy_project, project_files

from metaflowlib import registry
from metaflowlib.errors import RegistryError

pytestmark = pytest.mark.integration


def tracked_files():
    skipped = lambda f: f.startswith("tests/") or (f.startswith("bench/") and not f.startswith("bench/results/"))  # noqa: E731
    return [f for f in project_files() if not skipped(f)]


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data):
    """A throwaway copy of the project, its own git + DVC repo and MLflow store, with a tiny budget."""
    root = tmp_path_factory.mktemp("project")
    copy_project(root, tracked_files())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=str(shared_data), protocol="lake")  # no rotations: 4x fewer images to embed than vinyals
    method = params["methods"]["protonet"]
    method.update(ways=20, shots=5, queries=5)
    method["budget"]["default"] = {"episodes": 40}
    params["methods"] = {"protonet": method, "fomaml": {"kind": "fomaml", "tasks_per_step": 4, "queries": 5,
                                                        "budget": {"default": {"episodes": 20}}},
                         "param_prediction": {"kind": "param_prediction", "queries": 5,
                                              "budget": {"default": {"episodes": 100000, "seconds": 2}},  # the cap ends it
                                              "pretrain": {"batch_size": 512, "budget": {"default": {"epochs": 1}}}}}
    # explicit precision: timing each stage's step for `auto` (tests/test_precision.py, test_resume.py) costs a minute here
    params["train"].update(val_every=20, validation={"ways": 5, "shots": 1, "queries": 5, "tasks": 50}, precision="bf16",
                           channels_last=True)
    params["shift"].update(methods=["protonet", "fomaml"], tasks=3, corruptions=["gaussian_noise", "fog"])
    params["tta"]["data"].update(source=str(shared_data), images=20, corruptions=["gaussian_noise", "fog"], severities=[5])
    params["tta"]["training"].update(hidden=4, epochs=1, train_images=500, batch_size=64)
    params["tta"]["strategies"] = {k: params["tta"]["strategies"][k] for k in ("tent_learned",)}  # the others: test_tta_pipeline
    params["optimizer"].update(image_size=8, hidden=4, batch_size=8, net={"hidden_size": 4},
                               omniglot={"ways": 3, "train_per_class": 3, "test_per_class": 2},
                               fashion={"source": str(shared_data), "ways": 2, "train_classes": [0, 1, 2], "eval_classes": [5, 6],
                                        "train_per_class": 4, "test_per_class": 3},
                               meta_train={"unroll": 2, "horizon": 4, "budget": {"default": {"steps": 4}}, "validation_tasks": 1},
                               evaluate={"tasks": 1, "horizons": [1, 2], "record_every": 2, "tuning_tasks": 1,
                                         "adam_lrs": [0.01], "sgd_lrs": [0.1]},
                               finetune={"methods": ["fomaml"], "tasks": 3, "learned_steps": 2})
    params["evaluate"].update(tasks=60, timing_tasks=5, shots_curve=[1, 5])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # one thread per stage: beside the other xdist worker, two threads per process oversubscribe the 2 cores, and
    # oneDNN's convolutions then slow 2-9x (bench/results/precision_choice_cpu.json, busy_processes 1)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    commit(root, "project")
    return root, env


def commit(root, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", *identity, "commit", "-qm", message], cwd=root, check=True)


def dvc(root, env, *args):
    return subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)


def evaluation_runs(training_run_id: str) -> dict[str, mlflow.entities.Run]:
    """The evaluate@ runs of a training run (not their nested runs), current ones (no superseded_by tag) by run name;
    a name held twice fails."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.evaluated_run_id = '{training_run_id}' and tags.stage LIKE 'evaluate@%'")
    current = [r for r in runs if "superseded_by" not in r.data.tags and "mlflow.parentRunId" not in r.data.tags]
    names = [r.info.run_name for r in current]
    assert len(names) == len(set(names)), f"duplicate current evaluation runs: {sorted(names)}"
    return {r.info.run_name: r for r in current}


def ran_stages(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")]


WATCHERS = {"production_shift@protonet", "production_shift@fomaml", "production_tta", "production_optimizer", "production_finetune"}


def use_store(root) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{root / 'mlflow.db'}")


def experiments(shown: list[dict]) -> list[dict]:
    """The experiment revisions of `dvc exp show --json`, each {'name', 'params', 'metrics'} (files' data)."""
    out = []
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for rev in group["revs"]:
                data = rev["data"]
                out.append({"name": rev["name"], "params": data["params"]["params.yaml"]["data"],
                            "metrics": {path: m.get("data") for path, m in data["metrics"].items()}})
    return out


def test_dvc_repro_trains_evaluates_registers_and_serves(project):
    root, env = project
    first = dvc(root, env, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "register@protonet: omniglot-lake-protonet version 1; promoted" in first.stdout

    metrics = yaml.safe_load((root / "metrics" / "protonet" / "eval.json").read_text())
    assert set(metrics["episodes_digest"]) == {"5w1s", "5w5s", "20w1s", "20w5s"}
    assert metrics["acc_5w1s"] > 0.6 and metrics["ci95_5w1s"] > 0

    fomaml = yaml.safe_load((root / "metrics" / "fomaml" / "eval.json").read_text())
    assert set(fomaml["episodes_digest"]) == {"5w1s", "5w5s"}  # a 5-way head is scored on 5-way tasks only
    assert fomaml["episodes_digest"]["5w1s"] == metrics["episodes_digest"]["5w1s"]  # the same tasks as ProtoNet
    assert "register@fomaml: omniglot-lake-fomaml version 1; promoted" in first.stdout

    assert "pretrain@protonet: protonet starts from no pre-trained module; nothing to do" in first.stdout
    assert "registered omniglot-lake-param_prediction-embedding version 1" in first.stdout
    predictor = yaml.safe_load((root / "metrics" / "param_prediction" / "eval.json").read_text())
    assert predictor["acc_5w1s"] > 0.3 and predictor["pretrain_seconds"] > 0  # chance is 0.2; one epoch, not a time cap
    assert predictor["episodes_digest"] == metrics["episodes_digest"]
    capped = yaml.safe_load((root / "runs" / "param_prediction" / "train.json").read_text())
    assert capped["budget_capped"] is True and capped["meta_train_episodes"] < 100000
    assert "warning: train@param_prediction hit its 2s cap after" in first.stdout + first.stderr
    report = (root / "reports" / "summary.md").read_text()
    assert all(f"| {key} (" in report for key in ("protonet", "fomaml", "param_prediction"))
    assert (root / "reports" / "shots_curve.png").read_bytes()[:4] == b"\x89PNG"

    shift = yaml.safe_load((root / "metrics" / "shift" / "protonet.json").read_text())
    assert shift["model"] == {"name": "omniglot-lake-protonet", "version": "1", "run_id": shift["model"]["run_id"]}
    assert set(shift["accuracy"]) == {"source", "bn", "tent"} and set(shift["accuracy"]["bn"]) == {"clean", "gaussian_noise", "fog"}
    assert set(yaml.safe_load((root / "metrics" / "shift" / "fomaml.json").read_text())["accuracy"]) == {"source"}
    assert "## Under shift (Omniglot-C" in report
    assert (root / "metrics" / "tta" / "report.md").is_file() and (root / "metrics" / "learned_optimizer" / "eval.json").is_file()
    assert "| tent_learned |" in (root / "metrics" / "tta" / "report.md").read_text()  # TENT driven by the learned optimizer
    finetune = yaml.safe_load((root / "metrics" / "learned_optimizer" / "finetune.json").read_text())
    assert set(finetune["methods"]["fomaml"]["results"]) == {"sgd_3_steps", "learned_3_steps", "learned_2_steps"}  # fomaml: 3 test steps by default

    use_store(root)
    capped = yaml.safe_load((root / "runs" / "param_prediction" / "train.json").read_text())
    assert mlflow.get_run(capped["run_id"]).data.tags["budget_capped"].endswith("of 100000 episodes in the 2s cap")
    train = yaml.safe_load((root / "runs" / "protonet" / "train.json").read_text())
    run = mlflow.get_run(train["run_id"])
    assert {"meta_train_seconds", "peak_memory_mb", "train_loss", "val_accuracy"} <= set(run.data.metrics)
    assert not any(k.startswith(("acc_", "ci95_")) for k in run.data.metrics)  # evaluation never writes into the training run
    assert run.data.tags["method"] == "protonet" and run.data.params["method.ways"] == "20"
    assert train["budget_capped"] is False and "budget_capped" not in run.data.tags  # 40 episodes, no seconds cap
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [20, 40]
    evaluation = evaluation_runs(run.info.run_id)["protonet-evaluate"]
    assert evaluation.info.run_id == yaml.safe_load((root / "runs" / "protonet" / "evaluate.json").read_text())["run_id"]
    assert evaluation.data.metrics["acc_5w1s"] == metrics["acc_5w1s"] and evaluation.data.tags["evaluated_model_id"] == train["model_uri"].removeprefix("models:/")
    per_task = mlflow.artifacts.load_dict(f"runs:/{evaluation.info.run_id}/evaluation/per_task/5w1s.json")
    assert per_task["episodes_digest"] == metrics["episodes_digest"]["5w1s"] and len(per_task["task_accuracies"]) == 60
    assert np.mean(per_task["task_accuracies"]) == pytest.approx(metrics["acc_5w1s"], abs=1e-6)
    logged = {m.key: m.value for m in mlflow.get_logged_model(train["model_uri"].removeprefix("models:/")).metrics}
    assert logged["acc_5w1s"] == metrics["acc_5w1s"]  # the logged model (and so its versions) shows its accuracy
    children = {r.info.run_name: r for r in mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.`mlflow.parentRunId` = '{evaluation.info.run_id}'")}
    assert sorted(children) == ["evaluate/20w1s", "evaluate/20w5s", "evaluate/5w1s", "evaluate/5w5s"]  # shots 1, 5: settings' tasks
    five = children["evaluate/5w1s"]
    assert five.data.metrics == {"accuracy": metrics["acc_5w1s"], "ci95": metrics["ci95_5w1s"]}
    assert five.data.tags["episodes_digest"] == metrics["episodes_digest"]["5w1s"] and five.data.tags["shots"] == "1"
    assert {k: five.data.tags[k] for k in ("method", "profile", "data_digest", "git_commit", "stage")} == {
        "method": "protonet", "profile": "default", "data_digest": run.data.tags["data_digest"],
        "git_commit": run.data.tags["git_commit"], "stage": "evaluate@protonet"}
    version = mlflow.MlflowClient().get_model_version("omniglot-lake-protonet", "1")
    assert version.tags["evaluation_run_id"] == evaluation.info.run_id
    fomaml_run = yaml.safe_load((root / "runs" / "fomaml" / "train.json").read_text())["run_id"]
    assert sorted(evaluation_runs(fomaml_run)) == ["fomaml-evaluate"]
    version = mlflow.MlflowClient().get_model_version("omniglot-lake-param_prediction", "1")
    assert version.tags["feature_map_model"] == "omniglot-lake-param_prediction-embedding"
    assert version.tags["feature_map_version"] == "1"

    model = mlflow.pyfunc.load_model("models:/omniglot-lake-protonet@production")
    from metaflowlib.data.store import load_split

    images, labels = load_split(root / "data" / "prepared", "test")
    rng = np.random.default_rng(0)
    correct = total = 0
    for _ in range(20):
        classes = rng.choice(np.unique(labels), 5, replace=False)
        picks = [rng.permutation(np.flatnonzero(labels == c))[:6] for c in classes]
        support = np.stack([images[p[0]] for p in picks])
        query = np.concatenate([images[p[1:]] for p in picks])
        out = model.predict({"support_images": support, "support_labels": np.arange(5), "query_images": query})
        correct += int((out["labels"] == np.repeat(np.arange(5), 5)).sum())
        total += 25
    assert correct / total > 0.6  # chance is 0.2
    mlflow.set_tracking_uri(None)


def test_dvc_exp_run_in_a_temporary_workspace_keeps_its_runs_and_names_them(project):
    """`dvc exp run --temp` over a method param (target: ProtoNet's training) and an evaluation param (target:
    fomaml's registration): only what depends on each param reruns; `dvc exp show` lists the experiment with its
    values and metrics; the runs and the registered version land in the project's store (not the deleted temporary
    copy's), tagged with the experiment's name; fomaml's rerun evaluation keeps the earlier one, tagged superseded."""
    root, env = project
    use_store(root)
    protonet_before = yaml.safe_load((root / "runs" / "protonet" / "train.json").read_text())["run_id"]
    fomaml_run = yaml.safe_load((root / "runs" / "fomaml" / "train.json").read_text())["run_id"]
    fomaml_evaluation = evaluation_runs(fomaml_run)["fomaml-evaluate"].info.run_id
    commit(root, "pipeline results")  # an experiment starts from the last commit, as a user's does
    result = dvc(root, env, "exp", "run", "--temp", "-S", "methods.protonet.meta_optimizer.lr=0.002", "-S", "evaluate.timing_tasks=4",
                 "train@protonet", "register@fomaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = ran_stages(result)
    assert {"train@protonet", "evaluate@fomaml", "register@fomaml"} <= set(ran), ran
    assert "train@fomaml" not in ran and "pretrain@param_prediction" not in ran, ran
    assert "omniglot-lake-fomaml version 2" in result.stdout

    shown = dvc(root, env, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    swept = [e for e in experiments(json.loads(shown.stdout))
             if e["params"]["methods"]["protonet"]["meta_optimizer"]["lr"] == 0.002 and e["params"]["evaluate"]["timing_tasks"] == 4]
    assert len(swept) == 1
    name, accuracy = swept[0]["name"], swept[0]["metrics"]["metrics/fomaml/eval.json"]["acc_5w1s"]

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.dvc_exp_name = '{name}' and tags.stage = 'train@protonet'")
    assert len(runs) == 1 and runs[0].info.run_id != protonet_before  # in the project's store, named by the experiment
    assert runs[0].data.params["method.meta_optimizer.lr"] == "0.002"

    current = evaluation_runs(fomaml_run)["fomaml-evaluate"]  # fomaml's rerun evaluation: the earlier one is kept, superseded
    assert current.info.run_id != fomaml_evaluation and current.data.tags["dvc_exp_name"] == name
    assert current.data.metrics["acc_5w1s"] == accuracy  # dvc exp show and MLflow agree
    assert mlflow.get_run(fomaml_evaluation).data.tags["superseded_by"] == current.info.run_id
    assert mlflow.get_run(fomaml_evaluation).info.lifecycle_stage == "active"
    version = mlflow.MlflowClient().get_model_version("omniglot-lake-fomaml", "2")
    assert version.run_id == fomaml_run and version.tags["evaluation_run_id"] == current.info.run_id
    assert mlflow.pyfunc.load_model("models:/omniglot-lake-fomaml/2") is not None  # its artifacts outlive the temporary copy
    mlflow.set_tracking_uri(None)


def test_promote_reruns_exactly_the_consumers(project):
    """A person promotes fomaml v2 (scored on the same tasks as v1, so the paired gate refuses it without --force):
    `dvc repro` reruns the watchers and exactly the stages that read fomaml's production version, whose outputs and
    MLflow runs name v2. A rollback moves the same alias the same way (tests/test_registry.py: which version it
    restores), so it reaches the same consumers through the same watchers: one repro here, not two."""
    root, env = project
    use_store(root)

    with pytest.raises(RegistryError, match=re.escape("difference +0.0000, 95% interval [+0.0000, +0.0000] (paired bootstrap over 60 shared tasks)")):
        registry.promote("omniglot-lake-fomaml", "2", "acc_5w1s")  # the same model scored again: no gain beyond noise

    registry.promote("omniglot-lake-fomaml", "2", "acc_5w1s", force=True)
    version = "2"
    result = dvc(root, env, "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the consumers of fomaml's production version, and the report, which shows shift@fomaml's numbers
    assert set(ran_stages(result)) == WATCHERS | {"shift@fomaml", "optimizer_finetune", "report"}, (version, ran_stages(result))
    shift = yaml.safe_load((root / "metrics" / "shift" / "fomaml.json").read_text())
    finetune = yaml.safe_load((root / "metrics" / "learned_optimizer" / "finetune.json").read_text())
    assert shift["model"]["version"] == version and finetune["methods"]["fomaml"]["model"]["version"] == version
    shift_run = mlflow.get_run(yaml.safe_load((root / "runs" / "shift" / "fomaml.json").read_text())["run_id"])
    finetune_run = mlflow.get_run(yaml.safe_load((root / "runs" / "learned_optimizer" / "finetune.json").read_text())["run_id"])
    assert shift_run.data.tags["adapted_version"] == version
    assert finetune_run.data.tags["model_fomaml"] == f"omniglot-lake-fomaml v{version}"
    mlflow.set_tracking_uri(None)
