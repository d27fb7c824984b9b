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


def example_payload(size: int = 28) -> dict[str, np.ndarray]:
    """A 2-way 1-shot task of blank-ish images: small enough to store with the model."""
    images = np.full((4, size, size), 255, dtype=np.uint8)
    images[0, size // 4 : size // 2], images[2, size // 4 : size // 2] = 0, 0
    images[1, :, size // 2], images[3, :, size // 2] = 0, 0
    return {"support_images": images[:2], "support_labels": np.array([0, 1], dtype=np.int64), "query_images": images[2:]}


def log_pyfunc_model(omega_dir: str | Path, name: str = "model") -> str:
    """Log the pyfunc model into the active run; returns its model URI for registration."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"meta_knowledge": str(omega_dir)},
        signature=signature(),
        input_example=example_payload(),
        pip_requirements=[f"metaflowlib=={metaflowlib.__version__}", "torch", "safetensors", "numpy"],
    )
    return info.model_uri
