"""The MLflow pyfunc wrapper around one registered omega.

Logged as a model *from code* (this module's path, see `pyfunc_model.py`),
so MLflow stores no pickle: loading runs this code and reads the
safetensors + JSON artifact directory.
"""

from __future__ import annotations

import mlflow.pyfunc

from metaflowlib.errors import PayloadError


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

        if not isinstance(model_input, dict):
            raise PayloadError(
                f"expected a dict of arrays (support_images, support_labels, query_images), got {type(model_input).__name__}"
            )
        return predict_task(self.method, model_input, self.image_size, self.device)
