"""A registered omega served: adapts to each request's support set and labels its queries.

Predict contract: `metaflowlib.serving.contract`. The signature declares outputs only, so the
contract (not MLflow) refuses a malformed request, with its message.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from metaflowlib.errors import PayloadError
from metaflowlib.serving.log import label_outputs, log_code_model

ARTIFACT = "meta_knowledge"  # the omega directory (safetensors + JSON)


class RefusedPayload(PayloadError, MlflowException):
    """The contract's PayloadError as `mlflow models serve` answers it: HTTP 400, its one line as the message.

    The scoring server answers any other exception from predict with a generic message, and
    prefixes an MlflowException's `message` with a dump of the whole request
    (mlflow/pyfunc/scoring_server/__init__.py, `invocations`); the answer here keeps the line.
    """

    def __init__(self, message: str) -> None:
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)

    def serialize_as_json(self) -> str:
        """The server's answer, with the contract's line where MLflow has put the request dump in `message`."""
        return json.dumps({**json.loads(super().serialize_as_json()), "message": str(self)})


class FewShotModel(mlflow.pyfunc.PythonModel):
    """Adapts the stored meta-knowledge to each request's support set and labels its queries."""

    described = "a few-shot meta-model"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from metaflowlib.artifacts import load_meta_knowledge
        from metaflowlib.runtime import resolve_device

        self.device = resolve_device("auto")
        self.method, self.config = load_meta_knowledge(context.artifacts[ARTIFACT], self.device)
        self.image_size = int(self.config["extra"]["image_size"])

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        """{labels, probabilities} for one task; see metaflowlib.serving.contract."""
        from metaflowlib.serving.contract import predict_task

        try:
            return predict_task(self.method, model_input, self.image_size, self.device)
        except PayloadError as error:
            raise RefusedPayload(str(error)) from None


def signature():
    """Outputs only: an input schema would let MLflow cast the request before the contract sees it.

    With TensorSpec inputs the scoring server parses JSON with the spec's dtype (floats in [0, 1]
    become uint8 zeros, float labels are truncated) and `_enforce_schema` drops unknown keys and
    answers dtype mismatches itself; without one the model gets the request's own arrays and
    `metaflowlib.serving.contract` refuses what it must, with its message.
    """
    from mlflow.models import ModelSignature

    return ModelSignature(inputs=None, outputs=label_outputs())


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
    """Log the omega directory as a pyfunc model into the active run; returns its model URI for registration.

    `ways` sizes the stored input example (a fixed N-way head needs N-way tasks);
    the registry's load check replays that example before promoting.
    """
    return log_code_model({ARTIFACT: str(omega_dir)}, signature(), example_payload(ways), name)
