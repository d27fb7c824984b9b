"""MLflow runs: where they go, how they are named and tagged, and how metrics reach them."""

from __future__ import annotations

import os
import platform
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from metaflowlib.errors import MetaflowError
from metaflowlib.runtime import device_name

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # an unreachable server fails now, not after minutes of retries
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


def quiet_environment() -> None:
    """No telemetry, no retry storms, no progress bars or hint nags from MLflow in stage logs."""
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)


def configure(tracking_uri: str) -> str:
    """Point MLflow at `tracking_uri` after checking it can be reached; returns the URI used.

    An environment MLFLOW_TRACKING_URI wins over params, so one pipeline can
    run against a shared server without editing params.yaml.
    """
    import mlflow

    quiet_environment()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):  # a new store's schema is created once, not by two processes at the same time
        from metaflowlib.io import file_lock

        with file_lock(f"{Path(uri.removeprefix('sqlite:///')).expanduser()}.init.lock", timeout=300):
            mlflow.MlflowClient().search_experiments(max_results=1)
    return uri


def check_reachable(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise MetaflowError(f"MLflow store {uri}: directory {parent} does not exist or is not writable")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except (urllib.error.URLError, OSError) as error:
            raise MetaflowError(f"cannot reach the MLflow tracking server at {uri}: {error}") from None


def experiment_id(name: str, artifact_location: str) -> str:
    """The experiment's id, created with artifacts under the project for local stores."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        location = Path(artifact_location).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id  # another process created it just now


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def system_tags(device: torch.device) -> dict[str, str]:
    """Where a run ran: `device_name` is the GPU's name on CUDA, so `cpu_name` is recorded beside it."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_name": device_name(torch.device("cpu")),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
    }


def replace_child_runs(parent_run_id: str, stage: str, children: dict[str, tuple[dict[str, str], dict[str, float]]]) -> dict[str, str]:
    """One nested run per `children` entry (run name -> (tags, metrics)) under the parent, tagged `stage`; returns
    run name -> run id.

    The children an earlier run of `stage` left under this parent are deleted once the new set is logged, so a
    rerun replaces the set (as it replaces the parent's metrics) instead of piling up a second one beside it; deleted
    runs stay restorable until `mlflow gc`. Other stages' children of the parent are left alone.
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow.MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and tags.stage = '{stage}'"
    previous = [run.info.run_id for run in client.search_runs([experiment], query)]
    created = {}
    for name, (tags, metrics) in children.items():
        with mlflow.start_run(experiment_id=experiment, run_name=name, parent_run_id=parent_run_id, nested=True,
                              tags={**tags, "stage": stage}) as run:
            mlflow.log_metrics(metrics)
        created[name] = run.info.run_id
    for run_id in previous:
        client.delete_run(run_id)
    return created


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested params -> {'a.b': 'value'} for mlflow.log_params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten_params(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(data)}


class MetricLogger:
    """The training loop's `log` callback: metrics of the active run, batched per call."""

    def __init__(self, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(), run_id

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
