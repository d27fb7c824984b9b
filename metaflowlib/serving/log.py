"""Log one omega directory as an MLflow pyfunc model (from code: nothing is pickled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# the models-from-code entry point, passed by path: importing it would run set_model here
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# shipped with every model (code_paths): loading needs only mlflow and the requirements below, not this project
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def signature():
    """Outputs only: an input schema would let MLflow cast the request before the contract sees it.

    With TensorSpec inputs the scoring server parses JSON with the spec's dtype (floats in [0, 1]
    become uint8 zeros, float labels are truncated) and `_enforce_schema` drops unknown keys and
    answers dtype mismatches itself; without one the model gets the request's own arrays and
    `metaflowlib.serving.contract` refuses what it must, with its message.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    outputs = Schema([
        TensorSpec(np.dtype(np.int64), (-1,), "labels"),
        TensorSpec(np.dtype(np.float32), (-1, -1), "probabilities"),
    ])
    return ModelSignature(inputs=None, outputs=outputs)


def example_payload(ways: int = 2, size: int = 28) -> dict[str, np.ndarray]:
    """A `ways`-way 1-shot task of simple stroke images: small enough to store with the model."""
    images = np.full((2 * ways, size, size), 255, dtype=np.uint8)
    for k in range(ways):
        row = (k * size) // ways
        images[k, row : row + max(1, size // ways)] = 0  # class k: a horizontal band at its own height
        images[ways + k] = images[k]
    labels = np.arange(ways, dtype=np.int64)
    return {"support_images": images[:ways], "support_labels": labels, "query_images": images[ways:]}


def log_pyfunc_model(omega_dir: str | Path, ways: int = 2, name: str = "model") -> str:
    """Log the pyfunc model into the active run; returns its model URI for registration.

    `ways` sizes the stored input example (a fixed N-way head needs N-way tasks);
    the registry's load check replays that example before promoting.
    """
    return log_code_model(MODEL_CODE, {"meta_knowledge": str(omega_dir)}, signature(), example_payload(ways), name)


def requirements() -> list[str]:
    """What the shipped code needs besides mlflow: torch as trained with (its public version: a local
    segment such as +cu130 names a wheel index, not a release), and the readers of the artifacts."""
    import torch
    from packaging.version import Version

    return [f"torch=={Version(torch.__version__).public}", "safetensors>=0.4", "numpy>=1.26"]


def log_code_model(code: Path, artifacts: dict[str, str], model_signature, input_example: dict, name: str = "model") -> str:
    """The one way this project logs a model: MLflow "models from code" (`code` calls set_model)
    over safetensors + JSON artifact directories, so nothing is pickled; returns the model URI.

    The `metaflowlib` package goes with it (MLflow puts the model's `code/` first on sys.path when
    it loads), so `mlflow models serve` works where this project is not installed."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(code),
        artifacts=artifacts,
        code_paths=[str(PACKAGE_DIR)],
        signature=model_signature,
        input_example=input_example,
        pip_requirements=requirements(),
    )
    return info.model_uri


def unwrap_registered(uri: str, expected: type, what: str):
    """The loaded python model behind a registered URI, refusing one of another kind (`what` names the expected one)."""
    import mlflow

    from metaflowlib.errors import RegistryError

    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(model, expected):
        raise RegistryError(f"{uri} is not {what} (a {type(model).__name__})")
    return model
