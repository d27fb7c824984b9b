"""How this project logs and loads a model: MLflow "models from code" over safetensors + JSON, nothing pickled.

Every kind (few-shot omega: serving.fewshot, TTA classifier: serving.classifier, learned optimizer:
serving.learned_optimizer) is logged through `log_code_model` with the one entry point
`pyfunc_model.py`, and loaded back through `load_pyfunc`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TypeVar

import numpy as np

# the models-from-code entry point, passed by path: importing it would run set_model here
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# shipped with every model (code_paths): loading needs only mlflow and the requirements below, not this project
PACKAGE_DIR = Path(__file__).resolve().parent.parent
# where versions logged before issue 18 import their wrapper from -> where it is now. Their shipped code/
# cannot stand in: MLflow puts it on sys.path, but a process that has imported metaflowlib keeps this one.
LEGACY_WRAPPER_MODULES = {
    "metaflowlib.serving.pyfunc": "metaflowlib.serving.fewshot",
    "metaflowlib.tta.pyfunc": "metaflowlib.serving.classifier",
    "metaflowlib.learned_optimizer.pyfunc": "metaflowlib.serving.learned_optimizer",
}

Wrapper = TypeVar("Wrapper")


def requirements() -> list[str]:
    """What the shipped code needs besides mlflow: torch as trained with (its public version: a local
    segment such as +cu130 names a wheel index, not a release), and the readers of the artifacts."""
    import torch
    from packaging.version import Version

    return [f"torch=={Version(torch.__version__).public}", "safetensors>=0.4", "numpy>=1.26"]


def label_outputs():
    """{labels: int64 [N], probabilities: float32 [N, classes]}: what a few-shot model and a classifier answer."""
    from mlflow.types.schema import Schema, TensorSpec

    return Schema([
        TensorSpec(np.dtype(np.int64), (-1,), "labels"),
        TensorSpec(np.dtype(np.float32), (-1, -1), "probabilities"),
    ])


def strategy_params():
    """The inference param `strategy` (default 'source': the registered weights as they are), which the few-shot
    models and the TTA classifiers take: `predict(data, params={"strategy": "tent"})`, over HTTP
    `{"inputs": ..., "params": {"strategy": "tent"}}`. The wrapper refuses a strategy it does not know."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ParamSchema([ParamSpec("strategy", "string", "source")])


def log_code_model(artifacts: dict[str, str], model_signature, input_example: dict, name: str = "model",
                   model_config: dict | None = None) -> str:
    """Log one artifact directory (its name picks the wrapper, see serving.model) as a pyfunc model into the
    active run; returns the model URI. `model_config` (JSON-able: the wrapper's serving options) reaches the
    wrapper as `context.model_config`.

    The `metaflowlib` package goes with it (MLflow puts the model's `code/` first on sys.path when
    it loads), so `mlflow models serve` works where this project is not installed."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        code_paths=[str(PACKAGE_DIR)],
        signature=model_signature,
        input_example=input_example,
        pip_requirements=requirements(),
        model_config=model_config,
    )
    return info.model_uri


def load_pyfunc(uri: str):
    """`mlflow.pyfunc.load_model(uri)`, versions logged before issue 18 included."""
    import mlflow.pyfunc

    for old, new in LEGACY_WRAPPER_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))
    return mlflow.pyfunc.load_model(uri)


def unwrap_registered(uri: str, expected: type[Wrapper]) -> Wrapper:
    """The wrapper behind a registered URI (`models:/<name>/<version>`), refusing one of another kind."""
    from metaflowlib.errors import RegistryError
    from metaflowlib.serving.model import ServedModel

    model = load_pyfunc(uri).unwrap_python_model()
    wrapper = model.wrapper if isinstance(model, ServedModel) else model  # before issue 18: the wrapper itself
    if not isinstance(wrapper, expected):
        raise RegistryError(f"{uri} is not {expected.described} (its pyfunc is a {type(wrapper).__name__}); "
                            "mlflow.pyfunc.load_model loads any kind")
    return wrapper
