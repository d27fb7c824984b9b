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
