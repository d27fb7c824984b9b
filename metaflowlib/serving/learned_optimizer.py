"""The learned optimizer served (metaflowlib.learned_optimizer.learned's directory).

Predict contract: {"gradients": float [T, N]}, T successive gradients of N
coordinates -> {"updates": float32 [T, N]}, the update theta_{t+1} - theta_t
the optimizer takes for each, starting from fresh LSTM memory. The stages take
the LSTM itself: `unwrap_registered(uri, LearnedOptimizerModel).net`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np

from metaflowlib.errors import PayloadError
from metaflowlib.serving.log import log_code_model

ARTIFACT = "optimizer"  # the optimizer directory (safetensors + JSON)
MAX_VALUES = 10_000_000  # T x N per request: a larger payload is refused rather than exhausting memory


class LearnedOptimizerModel(mlflow.pyfunc.PythonModel):
    """Replays a gradient sequence through the stored LSTM optimizer."""

    described = "a learned optimizer"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from metaflowlib.learned_optimizer.learned import load_optimizer

        self.net = load_optimizer(context.artifacts[ARTIFACT]).eval()

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
        import torch

        grads = np.asarray(model_input["gradients"]) if isinstance(model_input, dict) and "gradients" in model_input else None
        if grads is None:
            raise PayloadError(f"expected a dict with key 'gradients', got {type(model_input).__name__}")
        if grads.dtype.kind != "f" or grads.ndim != 2 or not 0 < grads.size <= MAX_VALUES or not np.isfinite(grads).all():
            raise PayloadError(f"gradients must be finite floats [T, N] with 1 <= T x N <= {MAX_VALUES}, "
                               f"got {grads.dtype} {list(grads.shape)}")
        with torch.no_grad():
            state = self.net.zero_state(grads.shape[1])
            updates = []
            for g in torch.from_numpy(grads.astype(np.float32)):
                update, state = self.net(g, state)
                updates.append(update)
        return {"updates": torch.stack(updates).numpy()}


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "gradients")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "updates")]))


def example_payload() -> dict[str, np.ndarray]:
    """Three steps of four coordinates spanning the preprocessing's branches; replayed by the registry's load check."""
    return {"gradients": np.array([[1.0, -1e-3, 1e-6, 0.0], [0.5, -2e-3, 1e-6, 0.0], [0.25, -4e-3, 1e-6, 0.0]],
                                  dtype=np.float32)}


def log_optimizer_model(directory: str | Path, name: str = "model") -> str:
    """Log the optimizer directory (safetensors + JSON) as a pyfunc model into the active run; returns its URI."""
    return log_code_model({ARTIFACT: str(directory)}, signature(), example_payload(), name)
