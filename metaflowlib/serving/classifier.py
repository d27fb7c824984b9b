"""A TTA source classifier served (metaflowlib.tta.classifier's directory).

Predict contract: {"images": uint8 [N, H, W]} (0 = black background, 255 =
white, H = W = the trained image size) -> {"labels": int64 [N],
"probabilities": float32 [N, classes]}, in eval mode (each image independent
of its batch). The TTA stages take the torch module itself:
`unwrap_registered(uri, ClassifierModel).model`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np

from metaflowlib.errors import PayloadError
from metaflowlib.serving.log import label_outputs, log_code_model

ARTIFACT = "classifier"  # the classifier directory (safetensors + JSON)
MAX_IMAGES = 20_000  # per request: a larger payload is refused rather than exhausting memory


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Labels a batch of images with the stored classifier."""

    described = "a TTA source classifier"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from metaflowlib.runtime import resolve_device
        from metaflowlib.tta.classifier import load_classifier

        self.device = resolve_device("auto")
        self.model, self.config = load_classifier(context.artifacts[ARTIFACT], self.device)
        self.image_size = int(self.config["config"]["image_size"])

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        import torch

        from metaflowlib.tta.classifier import to_input

        images = np.asarray(model_input["images"]) if isinstance(model_input, dict) and "images" in model_input else None
        if images is None:
            raise PayloadError(f"expected a dict with key 'images', got {type(model_input).__name__}")
        side = self.image_size
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (side, side) or not 0 < len(images) <= MAX_IMAGES:
            raise PayloadError(
                f"images must be uint8 [N, {side}, {side}] with 1 <= N <= {MAX_IMAGES}, got {images.dtype} {list(images.shape)}"
            )
        with torch.no_grad():
            logits = self.model(to_input(images, self.device)).float()
        return {"labels": logits.argmax(-1).cpu().numpy(), "probabilities": logits.softmax(-1).cpu().numpy()}


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "images")]), outputs=label_outputs())


def example_payload(size: int) -> dict[str, np.ndarray]:
    """Two images (a dark and a bright square): small enough to store, replayed by the registry's load check."""
    images = np.zeros((2, size, size), dtype=np.uint8)
    images[1, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return {"images": images}


def log_classifier_model(directory: str | Path, image_size: int, name: str = "model") -> str:
    """Log the classifier directory as a pyfunc model into the active run; returns its model URI."""
    return log_code_model({ARTIFACT: str(directory)}, signature(), example_payload(image_size), name)
