"""The MLflow pyfunc wrapper around one registered omega.

Logged as a model *from code* (this module's path, see `pyfunc_model.py`),
so MLflow stores no pickle: loading runs this code and reads the
safetensors + JSON artifact directory.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from metaflowlib.errors import PayloadError


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

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from metaflowlib.artifacts import load_meta_knowledge
        from metaflowlib.runtime import resolve_device

        self.device = resolve_device("auto")
        self.method, self.config = load_meta_knowledge(context.artifacts["meta_knowledge"], self.device)
        self.image_size = int(self.config["extra"]["image_size"])

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        """{labels, probabilities} for one task; see metaflowlib.serving.contract."""
        from metaflowlib.serving.contract import predict_task

        try:
            return predict_task(self.method, model_input, self.image_size, self.device)
        except PayloadError as error:
            raise RefusedPayload(str(error)) from None
