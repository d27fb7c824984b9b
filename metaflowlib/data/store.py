"""Load a prepared split (Arrow on disk) back into arrays, or straight into a TaskPool; record the splits a run used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metaflowlib.errors import DataError

if TYPE_CHECKING:
    from metaflowlib.data.preprocess import ImageFormat


def _open_split(prepared_dir: str | Path, split: str):
    import datasets

    path = Path(prepared_dir) / split
    if not path.is_dir():
        raise DataError(f"prepared split {path} not found: run the prepare stage (`dvc repro prepare`)")
    return datasets.load_from_disk(str(path))


def _decode_pngs(column, where: Path) -> np.ndarray:
    """A `datasets.Image()` column of same-size PNGs -> one uint8 [M, S, S] or [M, S, S, 3] array, decoded by PIL
    straight from the Arrow bytes into one preallocated array: no per-row formatting and no list of arrays to stack
    (bench/prepared_decode.py: ~0.3 ms an 84x84 RGB image on 2 cores, a little faster than datasets' own decoding)."""
    import io

    from PIL import Image

    out, index = None, 0
    for chunk in column.chunks:
        for blob in chunk.field("bytes").to_pylist():
            with Image.open(io.BytesIO(blob)) as image:
                array = np.asarray(image)
            if out is None:
                out = np.empty((len(column), *array.shape), np.uint8)
            if array.shape != out.shape[1:]:
                raise DataError(f"{where}: image {index} is {list(array.shape)}, not {list(out.shape[1:])}: rerun the prepare stage")
            out[index] = array
            index += 1
    return out if out is not None else np.empty((0, 0, 0), np.uint8)


def load_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [M, S, S] (grayscale) or [M, S, S, 3] (RGB) and int labels [M] of one prepared split: Omniglot's
    Array2D column as is, custom data's PNG column decoded once."""
    import datasets

    dataset = _open_split(prepared_dir, split)
    labels = dataset.data.column("label").to_numpy().astype(np.int64)  # a writable copy, as torch wants
    if isinstance(dataset.features["image"], datasets.Image):
        return _decode_pngs(dataset.data.column("image"), Path(prepared_dir) / split), labels
    images = np.asarray(dataset.with_format("numpy")["image"][:], dtype=np.uint8)
    return images, labels


def load_class_names(prepared_dir: str | Path, split: str) -> list[str]:
    """A prepared split's class names by label: its ClassLabel's names (custom data), else its class_name column."""
    import datasets

    dataset = _open_split(prepared_dir, split)
    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    by_label = dict(zip(dataset.data.column("label").to_pylist(), dataset.data.column("class_name").to_pylist()))
    return [by_label[label] for label in range(len(by_label))]


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


def load_format(prepared_dir: str | Path) -> ImageFormat:
    """How the prepared images become model inputs, from info.json; one written before formats were recorded
    (no "format") is Omniglot's ink on paper at its "image_size"."""
    from metaflowlib.data.preprocess import ImageFormat

    info = load_info(prepared_dir)
    if "format" in info:
        return ImageFormat.from_dict(info["format"])
    if "image_size" not in info:
        raise DataError(f"{Path(prepared_dir) / 'info.json'} records neither a format nor an image_size: rerun the prepare stage")
    return ImageFormat.ink(int(info["image_size"]))


def load_pool(prepared_dir: str | Path, split: str, device):
    """A prepared split as a TaskPool of model-ready images on `device`, in the format its info.json records."""
    import torch

    from metaflowlib.data.preprocess import to_model_input
    from metaflowlib.episodes import TaskPool

    images, labels = load_split(prepared_dir, split)
    examples = to_model_input(images, load_format(prepared_dir)).to(device)
    return TaskPool(examples, torch.from_numpy(labels), name=split)
