"""MLflow "models from code" entry point of a TTA source classifier: executed when the model loads."""

import mlflow.models

from metaflowlib.tta.pyfunc import ClassifierModel

mlflow.models.set_model(ClassifierModel())
