"""Shared fixtures: tiny synthetic data, a throwaway MLflow store, the real data when present."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def load_stage(name: str):
    """Import pipelines/<name>.py as a module, to call a stage's functions in-process (its `_stage` import
    puts the project root on sys.path)."""
    sys.path.insert(0, str(ROOT / "pipelines"))
    try:
        spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "pipelines" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "pipelines"))


def class_images(classes: int, per_class: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (255 = paper) where each class is a distinct stroke pattern plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(classes):
        template = np.full((size, size), 255, dtype=np.uint8)
        row, col = rng.integers(2, size - 8, size=2)
        template[row : row + 6, :] = 0 if c % 2 == 0 else 255
        template[:, col : col + 6] = 0
        for _ in range(per_class):
            noisy = template.copy()
            flips = rng.random((size, size)) < 0.05
            noisy[flips] = 255 - noisy[flips]
            images.append(noisy)
            labels.append(c)
    return np.stack(images), np.asarray(labels)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core machine they made test files 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_pool():
    """A TaskPool of 12 separable classes x 10 examples, model-ready."""
    from metaflowlib.data.preprocess import to_model_input
    from metaflowlib.episodes import TaskPool

    images, labels = class_images(12, 10)
    return TaskPool(to_model_input(images, 28), torch.from_numpy(labels), name="tiny")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A throwaway SQLite MLflow store as the active tracking URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "omniglot" / "images_background.npz").exists():
        pytest.skip("real Omniglot data not found at ../shared/data")
    return SHARED_DATA
