"""Load a prepared split (Arrow on disk) back into arrays, or straight into a TaskPool; record the splits a run used."""

from __future__ import annotations

import hashlib
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


def info_digest(prepared_dir: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of the prepared data's info.json (dataset, source, size, split counts)."""
    return hashlib.sha256(json.dumps(load_info(prepared_dir), sort_keys=True).encode()).hexdigest()[:16]


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
