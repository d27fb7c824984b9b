"""The Python API (metaflowlib.api) and the registry views it shares with `metaflowlib models list/show`.

A throwaway MLflow store holds a tiny registered ProtoNet (two versions, the first in production), a
registered Fashion-MNIST classifier gated on clean accuracy, and a run that evaluated that classifier.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from metaflowlib import api, registry
from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.cli import main as cli
from metaflowlib.errors import PayloadError, RegistryError
from metaflowlib.methods import ProtoNet
from metaflowlib.serving.fewshot import log_pyfunc_model
from metaflowlib.tta.classifier import build_classifier, save_classifier
from metaflowlib.serving.classifier import log_classifier_model

from conftest import ROOT, class_images, register_evaluated

FEW_SHOT, CLASSIFIER = "toy-protonet", "toy-source"


def register_protonet(tmp_path, acc: float, seed: int) -> str:
    """A version of a tiny ProtoNet (initialized by `seed`), evaluated as evaluate@ does: per-task accuracies averaging `acc`."""
    torch.manual_seed(seed)
    omega = save_meta_knowledge(ProtoNet(hidden=8), tmp_path / f"omega{seed}", {"image_size": 28})
    with mlflow.start_run():
        uri = log_pyfunc_model(omega)
    return register_evaluated(uri, FEW_SHOT, acc)


@pytest.fixture
def store(tmp_path, mlflow_store):
    """The registry described above; returns the store's URI."""
    registry.promote(FEW_SHOT, register_protonet(tmp_path, 0.9, seed=0), "acc_5w1s")
    register_protonet(tmp_path, 0.8, seed=1)
    config = {"num_classes": 10, "image_size": 28, "hidden": 4}
    directory = save_classifier(build_classifier("source", **config), tmp_path / "classifier", "source", config, {})
    with mlflow.start_run():  # as tta_source: the gate metric in the version's own run
        mlflow.log_metric("acc_clean", 0.9023)
        uri = log_classifier_model(directory, 28)
    version = registry.register(uri, CLASSIFIER, {"acc_clean": 0.9023, registry.GATE_TAG: "acc_clean", "protocol": "fashion-mnist"},
                                "source classifier", "toy classifier")
    for error in (0.31, 0.30):  # a rerun of the same evaluation: only the latest is shown
        with mlflow.start_run(run_name="tta@source", tags={"model_name": CLASSIFIER, "model_version": version.version}):
            mlflow.log_metrics({"mean_error_s5": error, "mean_error_all": 0.2, "error_gaussian_noise_s5": 0.5})
    return mlflow_store


def task(ways: int = 3, shots: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    images, labels = class_images(ways, shots + 3, seed=4)
    support = np.concatenate([images[labels == c][:shots] for c in range(ways)])
    query = np.concatenate([images[labels == c][shots:] for c in range(ways)])
    return support, np.repeat(np.arange(ways), shots), query, np.repeat(np.arange(ways), 3)


def test_adapted_classifier_gives_the_served_models_answer(store):
    learner = api.load_production(FEW_SHOT, tracking_uri=store)
    assert (learner.version.name, learner.version.version) == (FEW_SHOT, "1")
    support, labels, query, _ = task()
    classifier = learner.adapt(support, labels)
    assert classifier.ways == 3
    predicted, probabilities = classifier.predict(query), classifier.predict_proba(query)
    served = mlflow.pyfunc.load_model(f"models:/{FEW_SHOT}@production").predict(
        {"support_images": support, "support_labels": labels, "query_images": query})
    assert predicted.tolist() == served["labels"].tolist() and np.allclose(probabilities, served["probabilities"])
    assert probabilities.shape == (9, 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert predicted.tolist() == probabilities.argmax(1).tolist()
    one_shot, one_label, _, _ = task(ways=5, shots=1)  # a query identical to its class's only support image: distance 0
    assert learner.adapt(one_shot, one_label).predict(one_shot[::-1]).tolist() == [4, 3, 2, 1, 0]
    other = api.load_version(FEW_SHOT, 2, tracking_uri=store)  # another omega: the same task, other probabilities
    assert other.version.version == "2" and not np.allclose(other.adapt(support, labels).predict_proba(query), probabilities)


def test_bad_tasks_and_models_fail_with_one_clear_error(store, tmp_path):
    learner = api.load_production(FEW_SHOT, tracking_uri=store)
    support, labels, query, _ = task()
    with pytest.raises(PayloadError, match="support_images must be uint8"):
        learner.adapt(support.astype(np.float32), labels)  # at adapt, before any query
    with pytest.raises(PayloadError, match="every class 0..N-1"):
        learner.adapt(support, labels + 1)
    with pytest.raises(PayloadError, match=r"query_images must have shape \[count, height, width\]"):
        learner.adapt(support, labels).predict(query[0])
    with pytest.raises(RegistryError, match="no registered model named 'ghost'"):
        api.load_production("ghost", tracking_uri=store)
    with pytest.raises(RegistryError, match=r"models:/toy-source/1 is not a few-shot meta-model \(its pyfunc is a ClassifierModel\)"):
        api.load_version(CLASSIFIER, 1, tracking_uri=store)
    with pytest.raises(RegistryError, match="toy-source has no 'production' version; promote one with"):
        api.load_production(CLASSIFIER, tracking_uri=store)


def test_the_argument_beats_the_environment_and_the_environment_is_left_as_it_was(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/empty.db")
    assert api.list_models() == []  # the environment's store
    assert [m["name"] for m in api.list_models(tracking_uri=store)] == [FEW_SHOT, CLASSIFIER]
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/empty.db"
    with pytest.raises(RegistryError, match=f"no registered model named '{FEW_SHOT}'"):
        api.load_production(FEW_SHOT)  # no argument: the environment's store again
    assert api.load_production(FEW_SHOT, tracking_uri=store).version.version == "1"


def test_registry_commands_mirror_the_cli(store):
    assert api.show(FEW_SHOT, tracking_uri=store).version == "1"
    refused = str(pytest.raises(RegistryError, api.promote, FEW_SHOT, 2).value)
    assert refused.startswith(f"refusing to promote {FEW_SHOT} v2: acc_5w1s 0.8000 vs production v1's 0.9000: difference -0.1000, "
                              "95% interval [-0.1000, -0.1000]"), refused  # api.promote: the default confidence
    assert api.promote(FEW_SHOT, 2, force=True).startswith(
        f"promoted {FEW_SHOT} v2 to production (forced); acc_5w1s 0.8000 vs production v1's 0.9000: difference -0.1000")
    assert api.show(FEW_SHOT, "@production").version == "2"
    assert api.rollback(FEW_SHOT) == f"rolled {FEW_SHOT} production back from v2 to v1"
    [evaluation] = api.evaluations(CLASSIFIER, 1)
    assert evaluation.run_name == "tta@source" and evaluation.metrics == {"mean_error_all": 0.2, "mean_error_s5": 0.30}


def test_models_list_and_show_print_the_numbers_each_kind_of_model_has(store, capsys):
    params = str(ROOT / "params.yaml")
    cli(["--params", params, "models", "list"])
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  v1 [production]  acc_5w1s 0.9000  run ") for line in out)
    assert any(line.startswith("  v1  acc_clean 0.9023  run ") for line in out)  # gated on clean accuracy, not a few-shot setting
    assert not any("not evaluated" in line for line in out)

    cli(["--params", params, "models", "show", CLASSIFIER, "1"])
    out = capsys.readouterr().out.splitlines()
    assert "evaluation: acc_clean 0.9023" in out
    start = out.index("evaluated by: 1 run(s), the latest of each stage")
    assert out[start + 1].startswith("  tta@source (run ")
    assert out[start + 2:] == ["    mean_error_all: 0.2000", "    mean_error_s5: 0.3000"]  # the summary, not every corruption


def test_an_ungated_version_shows_its_recorded_accuracy(store, capsys):
    client = mlflow.MlflowClient()
    client.delete_model_version_tag(CLASSIFIER, "1", registry.GATE_TAG)
    client.delete_model_version_tag(CLASSIFIER, "1", "acc_clean")
    client.set_model_version_tag(CLASSIFIER, "1", "val_accuracy_nearest_centroid", "0.98")
    cli(["--params", str(ROOT / "params.yaml"), "models", "list"])
    assert "  v1  val_accuracy_nearest_centroid 0.9800 (no gate metric)  run" in capsys.readouterr().out
    client.delete_model_version_tag(CLASSIFIER, "1", "val_accuracy_nearest_centroid")
    assert registry.headline(registry.get_version(CLASSIFIER, 1), "acc_5w1s") is None


def test_importing_metaflowlib_loads_neither_mlflow_nor_the_api():
    code = "import sys, metaflowlib; print(sorted(m for m in ('mlflow', 'metaflowlib.api', 'torch') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
