"""Load a prepared split (Arrow on disk) back into arrays, or straight into a TaskPool; record the splits a run used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from metaflowlib.errors import DataError, MetaflowError


def load_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [M, S, S] and int labels [M] of one prepared split."""
    import datasets

    path = Path(prepared_dir) / split
    if not path.is_dir():
        raise DataError(f"prepared split {path} not found: run the prepare stage (`dvc repro prepare`)")
    dataset = datasets.load_from_disk(str(path)).with_format("numpy")
    images = np.asarray(dataset["image"][:], dtype=np.uint8)
    labels = np.asarray(dataset["label"][:], dtype=np.int64)
    return images, labels


def split_digest(prepared_dir: str | Path, split: str) -> str:
    """First 16 hex digits of the SHA-256 of a prepared split's Arrow files in shard order: the bytes DVC tracks, so
    it changes exactly when the split does, and `cat data/prepared/<split>/*.arrow | sha256sum` checks it."""
    path = Path(prepared_dir) / split
    shards = sorted(path.glob("data-*.arrow"))  # data-00000-of-0000N.arrow: name order is shard order
    if not shards:
        raise DataError(f"prepared split {path} not found: run the prepare stage (`dvc repro prepare`)")
    digest = hashlib.sha256()
    for shard in shards:
        with open(shard, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def load_info(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "info.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage (`dvc repro prepare`)")
    return json.loads(path.read_text())


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


def load_pool(prepared_dir: str | Path, split: str, image_size: int, device):
    """A prepared split as a TaskPool of model-ready images on `device`."""
    import torch

    from metaflowlib.data.preprocess import to_model_input
    from metaflowlib.episodes import TaskPool

    images, labels = load_split(prepared_dir, split)
    examples = to_model_input(images, image_size).to(device)
    return TaskPool(examples, torch.from_numpy(labels), name=split)
