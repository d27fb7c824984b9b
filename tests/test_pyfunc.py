"""One entry point serves every kind by its artifact; versions logged before it load in this process too."""

from __future__ import annotations

import importlib
import sys

import mlflow
import pytest
import torch

from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.learned_optimizer.learned import LSTMOptimizerNet, save_optimizer
from metaflowlib.methods import ProtoNet
from metaflowlib.serving.log import LEGACY_WRAPPER_MODULES, unwrap_registered
from metaflowlib.serving.model import WRAPPERS
from metaflowlib.tta.classifier import build_classifier, save_classifier


def artifact_dir(artifact: str, tmp_path) -> str:
    """A small directory of the kind that `artifact` names."""
    torch.manual_seed(0)
    if artifact == "meta_knowledge":
        return str(save_meta_knowledge(ProtoNet(hidden=4), tmp_path / artifact, {"image_size": 28}))
    if artifact == "classifier":
        config = {"num_classes": 10, "image_size": 28, "hidden": 4}
        return str(save_classifier(build_classifier("source", **config), tmp_path / artifact, "source", config, {}))
    return str(save_optimizer(LSTMOptimizerNet(hidden_size=4), tmp_path / artifact))


def test_each_wrapper_is_named_by_the_artifact_its_module_logs():
    for artifact, (module, name) in WRAPPERS.items():
        wrapper_module = importlib.import_module(module)
        assert wrapper_module.ARTIFACT == artifact and isinstance(getattr(wrapper_module, name), type)
    assert set(LEGACY_WRAPPER_MODULES.values()) == {module for module, _ in WRAPPERS.values()}


@pytest.mark.parametrize("old_module", sorted(LEGACY_WRAPPER_MODULES))
def test_a_version_logged_before_the_one_entry_point_loads_in_this_process(old_module, tmp_path, mlflow_store, monkeypatch):
    """Its shipped entry imports its wrapper from `old_module`; with metaflowlib imported, its code/ cannot supply it."""
    new_module = LEGACY_WRAPPER_MODULES[old_module]
    artifact, name = next((a, n) for a, (m, n) in WRAPPERS.items() if m == new_module)
    entry = tmp_path / "pyfunc_model.py"
    entry.write_text(f"import mlflow.models\n\nfrom {old_module} import {name}\n\nmlflow.models.set_model({name}())\n")
    monkeypatch.setitem(sys.modules, old_module, importlib.import_module(new_module))  # the module as it was, to log
    with mlflow.start_run():
        artifacts = {artifact: artifact_dir(artifact, tmp_path)}
        uri = mlflow.pyfunc.log_model(name="model", python_model=str(entry), artifacts=artifacts).model_uri
    monkeypatch.delitem(sys.modules, old_module)
    wrapper_class = getattr(importlib.import_module(new_module), name)
    assert isinstance(unwrap_registered(uri, wrapper_class), wrapper_class)


def test_a_version_logged_with_the_old_signature_predicts_through_the_current_code(tmp_path, mlflow_store):
    """Before contract v2: outputs-only signature (no params schema), config without image_format, no model config."""
    import numpy as np
    from mlflow.models import ModelSignature
    from test_serving import payload

    from metaflowlib import api, registry
    from metaflowlib.serving.fewshot import ARTIFACT, example_payload
    from metaflowlib.serving.log import label_outputs, log_code_model

    with mlflow.start_run():
        old = ModelSignature(inputs=None, outputs=label_outputs())
        uri = log_code_model({ARTIFACT: artifact_dir("meta_knowledge", tmp_path)}, old, example_payload(2))
    version = registry.register(uri, "old-protonet", {}, "logged the old way", "toy").version
    model = mlflow.pyfunc.load_model(f"models:/old-protonet/{version}")
    assert model.metadata.get_params_schema() is None
    task = payload()
    out = model.predict(task)
    assert out["labels"].tolist() == out["probabilities"].argmax(1).tolist() and out["classes"].tolist() == [0, 1, 2]
    assert np.array_equal(model.predict(task, params={"strategy": "tent"})["probabilities"], out["probabilities"])  # MLflow drops it
    learner = api.load_version("old-protonet", version)  # the wrapper itself: the strategy reaches it, TENT at its defaults
    assert learner._model.tent.steps == 3 and learner._model.format.channels == 1
    classifier = learner.adapt(task["support_images"], task["support_labels"], strategy="tent")
    assert not np.allclose(classifier.predict_proba(task["query_images"]), out["probabilities"])
    rename = np.array(["b", "c", "a"])  # class k's name: the same task, its columns in another (sorted) order
    named = learner.adapt(task["support_images"], rename[task["support_labels"]])
    assert named.classes.tolist() == ["a", "b", "c"]
    assert named.predict(task["query_images"]).tolist() == rename[out["labels"]].tolist()


def test_a_new_version_records_its_format_its_strategy_param_and_its_tent_options(tmp_path, mlflow_store):
    from metaflowlib.data.preprocess import ImageFormat
    from metaflowlib.serving.fewshot import log_pyfunc_model

    fmt = ImageFormat(channels=3, image_size=20, ink_on_paper=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(0)
    omega = save_meta_knowledge(ProtoNet(in_channels=3, hidden=4), tmp_path / "omega", {"image_size": 20, "image_format": fmt.to_dict()})
    with mlflow.start_run():
        uri = log_pyfunc_model(omega, tent={"steps": 2, "lr": 0.05})
    model = mlflow.pyfunc.load_model(uri)
    assert model.input_example["support_images"].shape == (2, 20, 20, 3)  # the registry's load check replays it
    assert [(p.name, p.default) for p in model.metadata.get_params_schema().params] == [("strategy", "source")]
    assert model.metadata.get_input_schema() is None  # the contract, not MLflow, checks the payload
    wrapper = model.unwrap_python_model().wrapper
    assert (wrapper.format, wrapper.tent.steps, wrapper.tent.lr) == (fmt, 2, 0.05)
    answers = [model.predict(model.input_example, params={"strategy": s})["probabilities"] for s in ("tent", "tent", "source")]
    assert (answers[0] == answers[1]).all() and not (answers[0] == answers[2]).all()


def test_the_classifier_takes_the_strategy_param_and_its_recorded_tent_options(tmp_path, mlflow_store):
    import numpy as np

    from metaflowlib.errors import PayloadError
    from metaflowlib.serving.classifier import example_payload, log_classifier_model

    with mlflow.start_run():
        uri = log_classifier_model(artifact_dir("classifier", tmp_path), 28, tent={"steps": 2, "lr": 0.01})
    model = mlflow.pyfunc.load_model(uri)
    assert model.unwrap_python_model().wrapper.tent == {"steps": 2, "lr": 0.01}
    images = {"images": np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)}
    answers = {s: model.predict(images, params={"strategy": s})["probabilities"] for s in ("source", "bn", "tent")}
    assert not np.allclose(answers["source"], answers["bn"]) and not np.allclose(answers["bn"], answers["tent"])
    assert np.array_equal(model.predict(images, params={"strategy": "tent"})["probabilities"], answers["tent"])
    assert np.array_equal(model.predict(images)["probabilities"], answers["source"])  # nothing carried over
    with pytest.raises(PayloadError, match=r"^unknown strategy 'ttt'; known: source, bn, tent$"):
        model.predict(example_payload(28), params={"strategy": "ttt"})
