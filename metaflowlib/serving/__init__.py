"""The predict contract shared by the MLflow pyfunc model, the Python API and `mlflow models serve`."""
