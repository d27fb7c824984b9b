"""The real pipeline, end to end, on the real Omniglot data at a tiny budget (about 5 minutes on 2 quiet cores)."""

import json
import os
import shutil
import subprocess

import mlflow
import numpy as np
import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.integration


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    skipped = lambda f: f.startswith("tests/") or (f.startswith("bench/") and not f.startswith("bench/results/"))  # noqa: E731
    return [f for f in listed.stdout.splitlines() if not skipped(f) and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data):
    """A throwaway copy of the project, its own git + DVC repo and MLflow store, with a tiny budget."""
    root = tmp_path_factory.mktemp("project")
    for name in tracked_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["source"] = str(shared_data)
    method = params["methods"]["protonet"]
    method.update(ways=20, shots=5, queries=5)
    method["budget"]["default"] = {"episodes": 40}
    params["methods"] = {"protonet": method, "fomaml": {"kind": "fomaml", "tasks_per_step": 4, "queries": 5,
                                                        "budget": {"default": {"episodes": 20}}},
                         "param_prediction": {"kind": "param_prediction", "queries": 5, "budget": {"default": {"episodes": 20}},
                                              "pretrain": {"budget": {"default": {"seconds": 3}}}}}
    params["train"].update(val_every=20, validation={"ways": 5, "shots": 1, "queries": 5, "episodes": 50})
    params["shift"].update(methods=["protonet", "fomaml"], tasks=3, corruptions=["gaussian_noise", "fog"])
    params["tta"]["data"].update(source=str(shared_data), images=20, corruptions=["gaussian_noise", "fog"], severities=[5])
    params["tta"]["training"].update(hidden=4, epochs=1, train_images=500, batch_size=64)
    params["optimizer"].update(image_size=8, hidden=4, batch_size=8, net={"hidden_size": 4},
                               omniglot={"ways": 3, "train_per_class": 3, "test_per_class": 2},
                               fashion={"source": str(shared_data), "ways": 2, "train_classes": [0, 1, 2], "eval_classes": [5, 6],
                                        "train_per_class": 4, "test_per_class": 3},
                               meta_train={"unroll": 2, "horizon": 4, "budget": {"default": {"steps": 4}}, "validation_tasks": 1},
                               evaluate={"tasks": 1, "horizons": [1, 2], "record_every": 2, "tuning_tasks": 1,
                                         "adam_lrs": [0.01], "sgd_lrs": [0.1]},
                               finetune={"methods": ["fomaml"], "tasks": 3, "learned_steps": 2})
    params["evaluate"].update(episodes=100, timing_tasks=5, shots_curve=[1, 5])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", *identity, "commit", "-qm", "project"], cwd=root, check=True)
    return root, env


def dvc(root, env, *args):
    return subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)


def evaluation_runs(parent_run_id: str) -> dict[str, mlflow.entities.Run]:
    """Run name -> the nested evaluate@ runs under a training run that are not deleted; a name held twice fails."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.stage LIKE 'evaluate@%'")
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"duplicate nested runs: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


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
    assert "register@protonet: omniglot-vinyals-protonet version 1; promoted" in first.stdout

    metrics = yaml.safe_load((root / "metrics" / "protonet" / "eval.json").read_text())
    assert set(metrics["episodes_digest"]) == {"5w1s", "5w5s", "20w1s", "20w5s"}
    assert metrics["acc_5w1s"] > 0.6 and metrics["ci95_5w1s"] > 0

    fomaml = yaml.safe_load((root / "metrics" / "fomaml" / "eval.json").read_text())
    assert set(fomaml["episodes_digest"]) == {"5w1s", "5w5s"}  # a 5-way head is scored on 5-way tasks only
    assert fomaml["episodes_digest"]["5w1s"] == metrics["episodes_digest"]["5w1s"]  # the same tasks as ProtoNet
    assert "register@fomaml: omniglot-vinyals-fomaml version 1; promoted" in first.stdout

    assert "pretrain@protonet: protonet starts from no pre-trained module; nothing to do" in first.stdout
    assert "registered omniglot-vinyals-param_prediction-embedding version 1" in first.stdout
    predictor = yaml.safe_load((root / "metrics" / "param_prediction" / "eval.json").read_text())
    assert predictor["acc_5w1s"] > 0.4 and predictor["pretrain_seconds"] > 0  # chance is 0.2
    assert predictor["episodes_digest"] == metrics["episodes_digest"]
    report = (root / "reports" / "summary.md").read_text()
    assert all(f"| {key} (" in report for key in ("protonet", "fomaml", "param_prediction"))
    assert (root / "reports" / "shots_curve.png").read_bytes()[:4] == b"\x89PNG"

    shift = yaml.safe_load((root / "metrics" / "shift" / "protonet.json").read_text())
    assert shift["model"] == {"name": "omniglot-vinyals-protonet", "version": "1", "run_id": shift["model"]["run_id"]}
    assert set(shift["accuracy"]) == {"source", "bn", "tent"} and set(shift["accuracy"]["bn"]) == {"clean", "gaussian_noise", "fog"}
    assert set(yaml.safe_load((root / "metrics" / "shift" / "fomaml.json").read_text())["accuracy"]) == {"source"}
    assert "## Under shift (Omniglot-C" in report
    assert (root / "metrics" / "tta" / "report.md").is_file() and (root / "metrics" / "learned_optimizer" / "eval.json").is_file()
    assert "| tent_learned |" in (root / "metrics" / "tta" / "report.md").read_text()  # TENT driven by the learned optimizer
    finetune = yaml.safe_load((root / "metrics" / "learned_optimizer" / "finetune.json").read_text())
    assert set(finetune["methods"]["fomaml"]["results"]) == {"sgd_3_steps", "learned_3_steps", "learned_2_steps"}  # fomaml: 3 test steps by default

    second = dvc(root, env, "repro")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    ran = [line for line in second.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'tta_model':"]  # it always reads the MLflow aliases; nothing downstream changed

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{root / 'mlflow.db'}")
    run = mlflow.get_run(yaml.safe_load((root / "runs" / "protonet" / "train.json").read_text())["run_id"])
    assert {"acc_5w1s", "meta_train_seconds", "peak_memory_mb", "train_loss", "val_accuracy"} <= set(run.data.metrics)
    assert run.data.tags["method"] == "protonet" and run.data.params["method.ways"] == "20"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [20, 40]
    children = evaluation_runs(run.info.run_id)
    assert sorted(children) == ["evaluate/20w1s", "evaluate/20w5s", "evaluate/5w1s", "evaluate/5w5s"]  # shots 1, 5: settings' tasks
    five = children["evaluate/5w1s"]
    assert five.data.metrics == {"accuracy": metrics["acc_5w1s"], "ci95": metrics["ci95_5w1s"]}
    assert five.data.tags["episodes_digest"] == metrics["episodes_digest"]["5w1s"] and five.data.tags["shots"] == "1"
    assert {k: five.data.tags[k] for k in ("method", "profile", "data_digest", "git_commit", "stage")} == {
        "method": "protonet", "profile": "default", "data_digest": run.data.tags["data_digest"],
        "git_commit": run.data.tags["git_commit"], "stage": "evaluate@protonet"}
    fomaml_run = yaml.safe_load((root / "runs" / "fomaml" / "train.json").read_text())["run_id"]
    assert sorted(evaluation_runs(fomaml_run)) == ["evaluate/5w1s", "evaluate/5w5s"]
    version = mlflow.MlflowClient().get_model_version("omniglot-vinyals-param_prediction", "1")
    assert version.tags["feature_map_model"] == "omniglot-vinyals-param_prediction-embedding"
    assert version.tags["feature_map_version"] == "1"

    model = mlflow.pyfunc.load_model("models:/omniglot-vinyals-protonet@production")
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


def test_dvc_exp_run_sweeps_params_into_dvc_and_mlflow(project):
    """One `dvc exp run -S` over a method param and an evaluation param, limited to two methods' chains:
    only what depends on each param reruns; `dvc exp show` lists the experiment with its values and
    metrics; MLflow has a new training run with the swept param, new registered versions, and the
    rerun evaluation's nested runs replaced, not piled up."""
    root, env = project
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    protonet_before = yaml.safe_load((root / "runs" / "protonet" / "train.json").read_text())["run_id"]
    fomaml_run = yaml.safe_load((root / "runs" / "fomaml" / "train.json").read_text())["run_id"]
    result = dvc(root, env, "exp", "run", "-S", "methods.protonet.meta_optimizer.lr=0.002", "-S", "evaluate.timing_tasks=4",
                 "register@protonet", "register@fomaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert {"train@protonet", "evaluate@protonet", "evaluate@fomaml", "register@fomaml"} <= set(ran), ran
    assert "train@fomaml" not in ran and "pretrain@param_prediction" not in ran, ran
    assert "omniglot-vinyals-protonet version 2" in result.stdout and "omniglot-vinyals-fomaml version 2" in result.stdout

    shown = dvc(root, env, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    swept = [e for e in experiments(json.loads(shown.stdout))
             if e["params"]["methods"]["protonet"]["meta_optimizer"]["lr"] == 0.002 and e["params"]["evaluate"]["timing_tasks"] == 4]
    assert len(swept) == 1
    evaluation = yaml.safe_load((root / "metrics" / "protonet" / "eval.json").read_text())  # the experiment, applied to the workspace
    assert swept[0]["metrics"]["metrics/protonet/eval.json"]["acc_5w1s"] == evaluation["acc_5w1s"] > 0.4

    run_id = yaml.safe_load((root / "runs" / "protonet" / "train.json").read_text())["run_id"]
    assert run_id != protonet_before
    run = mlflow.get_run(run_id)
    assert run.data.params["method.meta_optimizer.lr"] == "0.002" and run.data.tags["stage"] == "train@protonet"
    assert run.data.metrics["acc_5w1s"] == evaluation["acc_5w1s"]
    assert evaluation_runs(run_id)["evaluate/5w1s"].data.metrics["accuracy"] == evaluation["acc_5w1s"]
    assert set(evaluation_runs(fomaml_run)) == {"evaluate/5w1s", "evaluate/5w5s"}  # fomaml's rerun replaced its set
    mlflow.set_tracking_uri(None)
