"""The pyfunc model every logged model loads as: the wrapper of the kind its artifact directory holds.

`pyfunc_model.py`, the one models-from-code entry point, sets a `ServedModel`; MLflow then calls
`load_context` with the model's artifacts, whose name says the kind. Each kind's module is imported
by name, so loading one kind runs no other kind's code (nor do the stages that log it depend on it).
`RefusedPayload` is how every kind answers a request its contract refuses: HTTP 400 with the contract's line.
"""

from __future__ import annotations

import importlib
import json

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from metaflowlib.errors import PayloadError

# artifact name (as `log_code_model` got it) -> (module, class) of its wrapper
WRAPPERS = {
    "meta_knowledge": ("metaflowlib.serving.fewshot", "FewShotModel"),
    "classifier": ("metaflowlib.serving.classifier", "ClassifierModel"),
    "optimizer": ("metaflowlib.serving.learned_optimizer", "LearnedOptimizerModel"),
}


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


class ServedModel(mlflow.pyfunc.PythonModel):
    """Loads the wrapper its one artifact calls for and answers through it."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        (artifact,) = context.artifacts
        if artifact not in WRAPPERS:
            raise ValueError(f"no wrapper serves an artifact named {artifact!r}; expected one of {sorted(WRAPPERS)}")
        module, name = WRAPPERS[artifact]
        self.wrapper = getattr(importlib.import_module(module), name)()
        self.wrapper.load_context(context)

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        return self.wrapper.predict(context, model_input, params)
