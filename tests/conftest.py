"""Shared fixtures: tiny synthetic data, a throwaway MLflow store, the real data when present."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# train@/pretrain@ cache their measured precision choice (metaflowlib.precision): the tests' own cache, not the user's
os.environ["METAFLOWLIB_CACHE_DIR"] = tempfile.mkdtemp(prefix="metaflowlib-test-cache-")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real pipeline's tests first: with `--dist loadfile --no-loadscope-reorder` a file goes to a worker in
    collection order, and test_pipeline.py (about 450 s on 2 cores) started after others made the suite wait for it;
    started first, the other worker runs every other file meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)


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


def project_files(root: Path = ROOT) -> list[str]:
    """The files a commit of `root` would hold (tracked, plus untracked ones .gitignore lets through), as paths
    relative to it, less anything inside a virtual environment: a directory holding pyvenv.cfg, whatever its name
    (a venv in the checkout made the project copy 1.3 GB and its `dvc exp run` 12 minutes, issue 17)."""
    listed = subprocess.run(["git", "ls-files", "-coz", "--exclude-standard"], cwd=root, capture_output=True, text=True, check=True)
    in_venv: dict[Path, bool] = {}  # directory -> whether it or a directory above it (below root) is a venv

    def venv(directory: Path) -> bool:
        if directory == Path("."):
            return False
        if directory not in in_venv:
            in_venv[directory] = (root / directory / "pyvenv.cfg").is_file() or venv(directory.parent)
        return in_venv[directory]

    return [f for f in listed.stdout.split("\0") if f and not venv(Path(f).parent) and (root / f).is_file()]


def copy_project(dest: Path, files: Iterable[str], root: Path = ROOT) -> None:
    """Copy `files` (paths relative to `root`, as `project_files` lists them) to the same places under `dest`."""
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)


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


TOY_DIGEST = "toy-fixed-tasks"  # episodes digest of the toy evaluations below: the same fixed tasks unless told


def save_synthetic_prepared(prepared: Path, classes: int, per_class: int) -> None:
    """A prepared dataset (train/val/test, `classes` classes of `per_class` 28x28 images each, one seed per split) in
    the pipeline's layout, as the `prepare` stage writes Omniglot."""
    from metaflowlib.data.prepare import Split, save_splits

    splits = {}
    for i, name in enumerate(("train", "val", "test")):
        images, labels = class_images(classes, per_class, seed=i)
        splits[name] = Split(images, labels, [f"c{c}" for c in range(classes)])
    save_splits(splits, prepared, {"dataset": "synthetic"})


def task_accuracies(mean: float, tasks: int = 100, spread: float = 0.1, seed: int = 0) -> list[float]:
    """`tasks` per-task accuracies averaging exactly `mean`: half the tasks at mean - d, half at mean + d, with
    d = `spread` narrowed to keep every accuracy in [0, 1], in an order fixed by `seed` (the same seed, the same
    hard tasks: versions built with it differ task by task by what their means and spreads differ by)."""
    if tasks % 2:
        raise ValueError(f"tasks must be even (half below the mean, half above), got {tasks}")
    d = min(spread, mean, 1 - mean)
    return np.random.default_rng(seed).permutation(np.repeat([mean - d, mean + d], tasks // 2)).tolist()


def register_evaluated(model_uri: str, name: str, accuracies: float | Iterable[float], *, protocol: str = "toy",
                       digest: str = TOY_DIGEST, setting: str = "5w1s", experiment_id: str | None = None,
                       tags: dict | None = None, model_description: str = "toy") -> str:
    """Register `model_uri` as a version of `name` the way evaluate@ and register@ do; returns its number.

    An evaluation run `<name>-evaluate` (tags stage=evaluate@<name>, evaluated_run_id = the run that logged the
    model) holds the metric acc_<setting> and the artifact evaluation/per_task/<setting>.json; the version is
    tagged with that mean, `protocol` and evaluation_run_id. `accuracies`: the per-task accuracies, or a target
    mean that `task_accuracies` turns into 100 of them."""
    import mlflow

    from metaflowlib import gate, registry

    scores = task_accuracies(accuracies) if isinstance(accuracies, (int, float)) else [float(a) for a in accuracies]
    mean = float(np.mean(scores))
    trained = mlflow.get_logged_model(model_uri.removeprefix("models:/")).source_run_id
    run_tags = {"stage": f"evaluate@{name}", "evaluated_run_id": trained}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{name}-evaluate", tags=run_tags) as run:
        mlflow.log_metric(f"acc_{setting}", mean)
        mlflow.log_dict({"setting": setting, "episodes_digest": digest, "task_accuracies": scores},
                        f"{gate.PER_TASK}/{setting}.json")
    version_tags = {f"acc_{setting}": mean, "protocol": protocol, gate.EVALUATION_RUN_TAG: run.info.run_id, **(tags or {})}
    return registry.register(model_uri, name, version_tags, f"acc_{setting} {mean:.4f}", model_description).version


@pytest.fixture(autouse=True)
def _mlflow_uris_stay_put():
    """MLflow 3's set_tracking_uri / set_registry_uri also write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into the
    environment, which every later test's subprocesses inherit (a served model looked for its version in another
    test's store): put both back after each test."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
