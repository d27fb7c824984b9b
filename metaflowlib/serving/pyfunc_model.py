"""MLflow "models from code" entry point of every model this project logs: executed when the model loads."""

import mlflow.models

from metaflowlib.serving.model import ServedModel

mlflow.models.set_model(ServedModel())
