"""MLflow "models from code" entry point of the learned optimizer: executed when the model loads."""

import mlflow.models

from metaflowlib.learned_optimizer.pyfunc import LearnedOptimizerModel

mlflow.models.set_model(LearnedOptimizerModel())
