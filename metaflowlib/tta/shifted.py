"""A shifted test set: a seeded subset of test images under every corruption x severity (e.g. Fashion-MNIST-C).

Stored as one directory: `images.safetensors` (uint8 `clean` [N, H, W],
int64 `labels` [N], uint8 `corrupted/<name>` [S, N, H, W] for the severities
in order) and `info.json`. The same images appear under every corruption and
severity, in one shuffled order, so test batches mix the classes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metaflowlib.data.corruptions import CORRUPTIONS, corrupt
from metaflowlib.errors import DataError
from metaflowlib.io import atomic_path
from metaflowlib.progress import track

IMAGES_FILE, INFO_FILE = "images.safetensors", "info.json"


@dataclass
class ShiftedSet:
    clean: np.ndarray
    labels: np.ndarray
    corrupted: dict[str, np.ndarray]  # corruption -> uint8 [S, N, H, W]
    severities: tuple[int, ...]
    info: dict[str, Any]

    def images(self, corruption: str, severity: int) -> np.ndarray:
        return self.corrupted[corruption][self.severities.index(severity)]


def corruption_seed(seed: int, name: str) -> int:
    """One noise stream per corruption, the same for a subset of corruptions (seed >= 0)."""
    return seed * len(CORRUPTIONS) + CORRUPTIONS.index(name)


def build_shifted(
    images: np.ndarray, labels: np.ndarray, count: int, corruptions: tuple[str, ...], severities: tuple[int, ...], seed: int
) -> ShiftedSet:
    """`count` test images drawn by `seed`, corrupted at each severity; deterministic in its arguments."""
    if count > len(labels):
        raise DataError(f"asked for {count} test images per corruption and severity, the test set has {len(labels)}")
    index = np.random.default_rng(seed).permutation(len(labels))[:count]
    clean, chosen = np.ascontiguousarray(images[index]), labels[index].astype(np.int64)
    corrupted = {}
    for name in track(corruptions, f"corrupting {count} images at severities {list(severities)}"):
        corrupted[name] = np.stack([corrupt(clean, name, s, corruption_seed(seed, name)) for s in severities])
    digest = hashlib.sha256(index.astype(np.int64).tobytes())
    for array in (clean, chosen, *corrupted.values()):
        digest.update(array.tobytes())
    info = {"images": count, "corruptions": list(corruptions), "severities": list(severities), "seed": seed,
            "digest": digest.hexdigest()[:16], "test_indices_sha256": hashlib.sha256(index.tobytes()).hexdigest()}
    return ShiftedSet(clean, chosen, corrupted, tuple(severities), info)


def save_shifted(shifted: ShiftedSet, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.numpy import save_file

    directory = Path(directory)
    arrays = {"clean": shifted.clean, "labels": shifted.labels,
              **{f"corrupted/{name}": array for name, array in shifted.corrupted.items()}}
    with atomic_path(directory, is_dir=True) as tmp:
        tmp.mkdir()
        save_file(arrays, str(tmp / IMAGES_FILE))
        (tmp / INFO_FILE).write_text(json.dumps({**shifted.info, **(extra or {})}, indent=2, sort_keys=True) + "\n")
    return directory


def load_shifted(directory: str | Path) -> ShiftedSet:
    """Read a set written by `save_shifted`; safetensors + JSON only."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        info = json.loads((directory / INFO_FILE).read_text())
        arrays = load_file(str(directory / IMAGES_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as error:
        raise DataError(f"cannot read the shifted test set in {directory} ({error}); rebuild it with `dvc repro tta_data`") from None
    corrupted = {name: arrays[f"corrupted/{name}"] for name in info["corruptions"]}
    return ShiftedSet(arrays["clean"], arrays["labels"], corrupted, tuple(info["severities"]), info)
