"""A registered omega served: adapts to each request's support set and labels its queries.

Predict contract: `metaflowlib.serving.contract`. The signature declares outputs and the inference param
`strategy`, no inputs, so the contract (not MLflow) refuses a malformed request, with its message.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from metaflowlib.errors import PayloadError
from metaflowlib.serving.log import log_code_model, strategy_params
from metaflowlib.serving.model import RefusedPayload

ARTIFACT = "meta_knowledge"  # the omega directory (safetensors + JSON)


class FewShotModel(mlflow.pyfunc.PythonModel):
    """Adapts the stored meta-knowledge to each request's support set and labels its queries."""

    described = "a few-shot meta-model"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from metaflowlib.artifacts import load_meta_knowledge
        from metaflowlib.runtime import resolve_device
        from metaflowlib.serving.contract import TentOptions, image_format_of

        self.device = resolve_device("auto")
        self.method, self.config = load_meta_knowledge(context.artifacts[ARTIFACT], self.device)
        self.format = image_format_of(self.config)
        self.tent = TentOptions(**(context.model_config or {}).get("tent", {}))  # none before it was recorded: defaults

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        """{labels, probabilities, classes} for one task; params {"strategy": ...}; see metaflowlib.serving.contract."""
        from metaflowlib.serving.contract import predict_task

        strategy = (params or {}).get("strategy", "source")
        try:
            return predict_task(self.method, model_input, self.format, self.device, strategy, self.tent)
        except PayloadError as error:
            raise RefusedPayload(str(error)) from None


def signature():
    """Outputs and the `strategy` param, no inputs: an input schema would let MLflow cast the request before the
    contract sees it.

    With TensorSpec inputs the scoring server parses JSON with the spec's dtype (floats in [0, 1]
    become uint8 zeros, float labels are truncated) and `_enforce_schema` drops unknown keys and
    answers dtype mismatches itself; without one the model gets the request's own arrays and
    `metaflowlib.serving.contract` refuses what it must, with its message. A params schema alone
    changes none of that: `_validate_prediction_input` enforces the input schema only when there is
    one, and params separately (`_enforce_params_schema`: the declared default when a param is
    absent, MLflow's own refusal for a non-string). Labels and classes are ints or names: object.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    outputs = Schema([
        TensorSpec(np.dtype(object), (-1,), "labels"),
        TensorSpec(np.dtype(np.float32), (-1, -1), "probabilities"),
        TensorSpec(np.dtype(object), (-1,), "classes"),
    ])
    return ModelSignature(inputs=None, outputs=outputs, params=strategy_params())


def example_payload(ways: int = 2, size: int = 28, channels: int = 1) -> dict[str, np.ndarray]:
    """A `ways`-way 1-shot task of simple stroke images in the model's layout: small enough to store with the model."""
    images = np.full((2 * ways, size, size), 255, dtype=np.uint8)
    for k in range(ways):
        row = (k * size) // ways
        images[k, row : row + max(1, size // ways)] = 0  # class k: a horizontal band at its own height
        images[ways + k] = images[k]
    if channels == 3:
        images = np.repeat(images[..., None], 3, axis=3)
    labels = np.arange(ways, dtype=np.int64)
    return {"support_images": images[:ways], "support_labels": labels, "query_images": images[ways:]}


def log_pyfunc_model(omega_dir: str | Path, ways: int = 2, name: str = "model", tent: dict | None = None) -> str:
    """Log the omega directory as a pyfunc model into the active run; returns its model URI for registration.

    `ways` sizes the stored input example (a fixed N-way head needs N-way tasks), in the format of omega's
    config.json; the registry's load check replays that example before promoting. `tent` ({steps, lr}:
    params.yaml serving.tent_fewshot) is what the `tent` strategy takes at serving time, kept in the model config.
    """
    from metaflowlib.io import CONFIG_FILE
    from metaflowlib.serving.contract import image_format_of

    fmt = image_format_of(json.loads((Path(omega_dir) / CONFIG_FILE).read_text()))
    example = example_payload(ways, fmt.image_size, fmt.channels)
    return log_code_model({ARTIFACT: str(omega_dir)}, signature(), example, name, {"tent": dict(tent)} if tent else None)
