"""MLflow "models from code" entry point: executed by MLflow when the model loads."""

import mlflow.models

from metaflowlib.serving.pyfunc import FewShotModel

mlflow.models.set_model(FewShotModel())
