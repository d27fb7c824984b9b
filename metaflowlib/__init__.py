"""metaflowlib: meta-learning methods and test-time adaptation as one reproducible pipeline.

The core (data, episodes, models, methods, training loop, evaluation) imports
torch and numpy only; tracking, registry and CLI add mlflow, dvc and pydantic.
"""

__version__ = "0.1.0"
