"""A TTA source classifier served (metaflowlib.tta.classifier's directory).

Predict contract: {"images": uint8 [N, H, W]} (0 = black background, 255 =
white, H = W = the trained image size) -> {"labels": int64 [N],
"probabilities": float32 [N, classes]}. Inference param `strategy`: `source`
(default: eval mode, each image independent of its batch), `bn` (the request's
images are the test batch of BatchNorm) or `tent` (entropy steps on BatchNorm
affine over that batch, serving.tent_classifier's steps and lr as recorded at
logging); each request adapts a copy of the registered weights. The TTA stages
take the torch module itself: `unwrap_registered(uri, ClassifierModel).model`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from metaflowlib.errors import PayloadError
from metaflowlib.serving.log import label_outputs, log_code_model, strategy_params
from metaflowlib.serving.model import RefusedPayload

ARTIFACT = "classifier"  # the classifier directory (safetensors + JSON)
MAX_IMAGES = 20_000  # per request: a larger payload is refused rather than exhausting memory
STRATEGIES = ("source", "bn", "tent")
TENT_DEFAULTS = {"steps": 1, "lr": 1e-3}  # Wang et al.'s reference (params.yaml serving.tent_classifier), for older versions


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Labels a batch of images with the stored classifier."""

    described = "a TTA source classifier"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from metaflowlib.runtime import resolve_device
        from metaflowlib.tta.classifier import load_classifier

        self.device = resolve_device("auto")
        self.model, self.config = load_classifier(context.artifacts[ARTIFACT], self.device)
        self.image_size = int(self.config["config"]["image_size"])
        self.tent = {**TENT_DEFAULTS, **(context.model_config or {}).get("tent", {})}

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        try:
            return self._predict(model_input, (params or {}).get("strategy", "source"))
        except PayloadError as error:
            raise RefusedPayload(str(error)) from None

    def _predict(self, model_input: Any, strategy: Any) -> dict[str, np.ndarray]:
        import torch

        from metaflowlib.tta.classifier import to_input
        from metaflowlib.tta.strategies import build_adapter

        images = np.asarray(model_input["images"]) if isinstance(model_input, dict) and "images" in model_input else None
        if images is None:
            raise PayloadError(f"expected a dict with key 'images', got {type(model_input).__name__}")
        side = self.image_size
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (side, side) or not 0 < len(images) <= MAX_IMAGES:
            raise PayloadError(
                f"images must be uint8 [N, {side}, {side}] with 1 <= N <= {MAX_IMAGES}, got {images.dtype} {list(images.shape)}"
            )
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise PayloadError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        if strategy != "source" and len(images) < 2:
            raise PayloadError(f"strategy {strategy!r} adapts to the batch of images and needs at least 2, got {len(images)}")
        x = to_input(images, self.device)
        with torch.no_grad():
            if strategy == "source":  # the registered module itself, in eval mode: no copy
                logits = self.model(x).float()
            else:
                options = {} if strategy == "bn" else {
                    "steps": int(self.tent["steps"]), "optimizer": functools.partial(torch.optim.Adam, lr=float(self.tent["lr"]))}
                logits = build_adapter(strategy, self.model, **options).predict(x).float()  # adapts a copy
        return {"labels": logits.argmax(-1).cpu().numpy(), "probabilities": logits.softmax(-1).cpu().numpy()}


def signature():
    """uint8 images (MLflow may check these: the classifier's input is one fixed array) and the `strategy` param."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "images")]), outputs=label_outputs(),
                          params=strategy_params())


def example_payload(size: int) -> dict[str, np.ndarray]:
    """Two images (a dark and a bright square): small enough to store, replayed by the registry's load check."""
    images = np.zeros((2, size, size), dtype=np.uint8)
    images[1, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return {"images": images}


def log_classifier_model(directory: str | Path, image_size: int, name: str = "model", tent: dict | None = None) -> str:
    """Log the classifier directory as a pyfunc model into the active run; returns its model URI. `tent`
    ({steps, lr}: params.yaml serving.tent_classifier) is what the `tent` strategy takes, kept in the model config."""
    return log_code_model({ARTIFACT: str(directory)}, signature(), example_payload(image_size), name,
                          {"tent": dict(tent)} if tent else None)
