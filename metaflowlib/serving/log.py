"""Log one omega directory as an MLflow pyfunc model (from code: nothing is pickled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import metaflowlib

# the models-from-code entry point, passed by path: importing it would run set_model here
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = Schema([
        TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "support_images"),
        TensorSpec(np.dtype(np.int64), (-1,), "support_labels"),
        TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "query_images"),
    ])
    outputs = Schema([
        TensorSpec(np.dtype(np.int64), (-1,), "labels"),
        TensorSpec(np.dtype(np.float32), (-1, -1), "probabilities"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


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


def log_code_model(code: Path, artifacts: dict[str, str], model_signature, input_example: dict, name: str = "model") -> str:
    """The one way this project logs a model: MLflow "models from code" (`code` calls set_model)
    over safetensors + JSON artifact directories, so nothing is pickled; returns the model URI."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(code),
        artifacts=artifacts,
        signature=model_signature,
        input_example=input_example,
        pip_requirements=[f"metaflowlib=={metaflowlib.__version__}", "torch", "safetensors", "numpy"],
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
