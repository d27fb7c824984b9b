"""Load a prepared split (Arrow on disk) back into arrays, or straight into a TaskPool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metaflowlib.errors import DataError


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


def load_info(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "info.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage (`dvc repro prepare`)")
    return json.loads(path.read_text())


def load_pool(prepared_dir: str | Path, split: str, image_size: int, device):
    """A prepared split as a TaskPool of model-ready images on `device`."""
    import torch

    from metaflowlib.data.preprocess import to_model_input
    from metaflowlib.episodes import TaskPool

    images, labels = load_split(prepared_dir, split)
    examples = to_model_input(images, image_size).to(device)
    return TaskPool(examples, torch.from_numpy(labels), name=split)
