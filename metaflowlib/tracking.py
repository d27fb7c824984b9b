"""MLflow runs: where they go, how they are named and tagged, and how metrics reach them."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from metaflowlib.entry import quiet_environment
from metaflowlib.errors import Interrupted, MetaflowError

if TYPE_CHECKING:  # torch is imported where a run's device is described, not by every stage that tags a run
    import torch
    from mlflow import ActiveRun

    from metaflowlib.config import Params

_configured: str | None = None  # the store `configure` last pointed MLflow at, in this process


def configure(tracking_uri: str) -> str:
    """Point MLflow at `tracking_uri` after checking it can be reached; returns the URI used.

    An environment MLFLOW_TRACKING_URI wins over params, so one pipeline can
    run against a shared server without editing params.yaml.
    """
    import mlflow

    quiet_environment()
    uri = resolve_store(os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):  # a new store's schema is created once, not by two processes at the same time
        from metaflowlib.io import file_lock

        with file_lock(f"{Path(uri.removeprefix('sqlite:///')).expanduser()}.init.lock", timeout=300):
            mlflow.MlflowClient().search_experiments(max_results=1)
    global _configured
    _configured = uri
    return uri


def store_root() -> Path:
    """The folder a relative local store and artifact location belong to: the DVC repository running the stage.

    `dvc exp run --temp` and `--queue` run stages in a temporary copy that is deleted afterwards; DVC passes the
    parent repository as DVC_ROOT, so their runs and registry versions land in the same store as `dvc repro`'s.
    Outside DVC: the working directory.
    """
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def resolve_store(uri: str) -> str:
    """`sqlite:///mlflow.db` -> an absolute path under `store_root()`; other URIs unchanged."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return uri
    return prefix + str((store_root() / Path(uri.removeprefix(prefix)).expanduser()).resolve())


def run_tags() -> dict[str, str]:
    """Tags every run gets: the DVC experiment that produced it, so a row of `dvc exp show` leads to its runs
    (`tags.dvc_exp_name = '<name>'`) and a run back to its row."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


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


# The MLflow UI's experiment kind (mlflow/server/js/build: `mlflow.experimentKind`, "custom_model_development" shows
# as "Machine learning"). MLflow 3.17's UI picks the kind from its workflow toggle instead (see `ui_link`); the tag
# tells earlier MLflow 3 UIs and any client reading it that this is classic model training, not a GenAI app.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(name: str, artifact_location: str) -> str:
    """The experiment's id, created with artifacts under the project for local stores; it carries the kind tag
    (added to an existing experiment without one, kept if someone chose another kind)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if KIND_TAG not in experiment.tags:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
        return experiment.experiment_id
    location = None
    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        location = Path(artifact_location).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id  # another process created it just now, tag included


def ui_link(experiment: str, base: str | None = None) -> str:
    """The MLflow UI's runs table of an experiment. MLflow 3.17 opens an experiment on its GenAI overview (traces,
    token usage) whatever its kind tag says: the UI's workflow toggle, remembered per browser, defaults to GenAI,
    and only `workflowType=machine_learning` in the URL switches it (mlflow/server/js/build, hash routes).

    `base` is the UI's address: by default the tracking server itself, or for a local store `mlflow ui`'s
    http://127.0.0.1:5000.
    """
    import mlflow

    if base is None:
        uri = mlflow.get_tracking_uri()
        base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def system_tags(device: torch.device) -> dict[str, str]:
    """Where a run ran: `device_name` is the GPU's name on CUDA, so `cpu_name` is recorded beside it."""
    import torch

    from metaflowlib.runtime import device_name

    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_name": device_name(torch.device("cpu")),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
    }


SUPERSEDED = "superseded_by"  # tag on a run a later run of the same stage replaced, naming the later run


def log_child_runs(parent_run_id: str, stage: str, children: dict[str, tuple[dict[str, str], dict[str, float]]]) -> dict[str, str]:
    """One nested run per `children` entry (run name -> (tags, metrics)) under the parent, tagged `stage`; returns
    run name -> run id."""
    import mlflow

    experiment = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
    created = {}
    for name, (tags, metrics) in children.items():
        with mlflow.start_run(experiment_id=experiment, run_name=name, parent_run_id=parent_run_id, nested=True,
                              tags={**run_tags(), **tags, "stage": stage}) as run:
            mlflow.log_metrics(metrics)
        created[name] = run.info.run_id
    return created


def supersede(run_id: str, same: dict[str, str]) -> list[str]:
    """Tag every earlier top-level run that shares `same` tags with `run_id`, and its nested runs, `superseded_by=<run_id>`.

    A rerun keeps its predecessors as history instead of deleting them; a search for the current result adds
    a check that the run has no `superseded_by` tag. Returns the runs tagged now.
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow.MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in same.items())
    earlier = [r.info.run_id for r in client.search_runs([experiment], query)
               if r.info.run_id != run_id and SUPERSEDED not in r.data.tags and MLFLOW_PARENT_RUN_ID not in r.data.tags]
    for parent in list(earlier):
        earlier += [r.info.run_id for r in client.search_runs([experiment], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")]
    for earlier_id in earlier:
        client.set_tag(earlier_id, SUPERSEDED, run_id)
    return earlier


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested params -> {'a.b': 'value'} for mlflow.log_params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten_params(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(data)}


def log_splits(prepared_dir: str | Path, splits: dict[str, str]) -> None:
    """Log prepared splits (split -> context, e.g. {"train": "training", "val": "validation"}) as the active run's
    dataset inputs, so the runs table's Dataset column shows what a run used and `dataset.digest = '<d>'` finds
    every run that used the same bytes. Each is named `<dataset>/<split>` (info.json's dataset), with the split's
    content digest (`split_digest`) and its folder as source. The rows stay on disk: MLflow's own digest and
    schema inference would convert 10,000 of them, and both fail on the image arrays. Logging a split again to
    the same run adds nothing.
    """
    import datasets
    import mlflow

    from metaflowlib.data.store import load_info, split_digest
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    if mlflow.active_run() is None:  # mlflow.log_input would start a stray run of its own
        raise MetaflowError("log_splits logs into the active MLflow run, and none is active")
    name = load_info(prepared_dir)["dataset"]
    for split, context in splits.items():
        path = Path(prepared_dir) / split
        digest = split_digest(prepared_dir, split)
        source = get_dataset_source_from_json(json.dumps({"uri": path.resolve().as_uri()}), source_type="local")
        dataset = mlflow.data.from_huggingface(datasets.load_from_disk(str(path)), targets="label",
                                               name=f"{name}/{split}", digest=digest, source=source)
        # the columns prepare.save_splits writes; set here because MLflow 3.17 cannot infer a type for image arrays
        dataset.schema = Schema([ColSpec(Array(Array(DataType.integer)), "image"), ColSpec(DataType.integer, "label"),
                                 ColSpec(DataType.string, "class_name")])
        mlflow.log_input(dataset, context=context)


def note_capped(done: int, budget: Any, stage: str) -> bool:
    """Whether the budget's seconds cap stopped the run before its count (`budget`: a params budget); if so the run
    is tagged `budget_capped` and a warning says that the result depends on this machine's speed."""
    import mlflow

    capped = budget.seconds is not None and done < budget.count
    if capped:
        mlflow.set_tag("budget_capped", f"{done:g} of {budget.count} {budget.unit} in the {budget.seconds:g}s cap")
        print(f"warning: {stage} hit its {budget.seconds:g}s cap after {done:g} of {budget.count} {budget.unit}; the result "
              "depends on this machine's speed (MLflow tag budget_capped)", file=sys.stderr, flush=True)
    return capped


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


def start_run(experiment: str, artifact_location: str, run_name: str, tags: dict[str, str], **kwargs: Any):
    """The one way a stage opens an MLflow run: in `experiment` (created with its artifacts under `store_root()`
    when new), tagged with `run_tags()`; a context manager yielding the run, as `mlflow.start_run`."""
    import mlflow

    location = str(store_root() / artifact_location)
    return mlflow.start_run(experiment_id=experiment_id(experiment, location), run_name=run_name,
                            tags={**run_tags(), **tags}, **kwargs)


def own_tags(run: ActiveRun) -> dict[str, str]:
    """The tags a stage gave its run (MLflow's own `mlflow.*` tags left out), for runs that inherit them."""
    return {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}


@contextlib.contextmanager
def stage_run(p: Params, stage: str, run_name: str, *, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
              device: torch.device | None = None, experiment: str | None = None, run_id: str | None = None) -> Iterator[ActiveRun]:
    """The one way a stage opens its MLflow run: the store from params (`configure`, once per process), the experiment
    (params' unless named), tags {stage, the DVC experiment, where it ran (`device`), `tags`}, `params` flattened (not
    again when resuming `run_id`), and the run marked KILLED, not FAILED, when a signal stops the stage."""
    import mlflow

    if _configured != resolve_store(os.environ.get("MLFLOW_TRACKING_URI") or p.mlflow.tracking_uri):
        configure(p.mlflow.tracking_uri)  # not again when the stage already opened the store to read the registry
    tags = {"stage": stage, **(system_tags(device) if device is not None else {}), **(tags or {})}
    with start_run(experiment or p.experiment, p.mlflow.artifact_location, run_name, tags, run_id=run_id) as run:
        if params and run_id is None:
            mlflow.log_params(flatten_params(params))
        try:
            yield run
        except Interrupted:
            mlflow.end_run(status="KILLED")
            raise
