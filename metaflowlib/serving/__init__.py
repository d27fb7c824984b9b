"""Every model this project logs, as MLflow serves it: the wrappers (few-shot omega, TTA classifier, learned
optimizer), the one models-from-code entry point, the few-shot predict contract shared with the Python API."""
