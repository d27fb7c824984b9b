"""The learned optimizer's task sets, built from the `optimizer:` params section and the image pools.

Pools are class-disjoint by construction:
- meta-training: Omniglot train classes, Fashion-MNIST `train_classes`;
- lr tuning and the registry gate: Omniglot val classes, Fashion-MNIST `train_classes` (other seeds);
- evaluation: Omniglot test classes, Fashion-MNIST `eval_classes`, each with the meta-training
  architectures and the unseen one.

`op` below is `metaflowlib.config.LearnedOptimizerParams` (duck-typed: this
module imports only torch and numpy, like the rest of the core).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaflowlib.learned_optimizer.tasks import (
    ClassifierTask,
    ImagePool,
    TaskDistribution,
    TaskFamily,
    make_task,
)

OMNIGLOT_SPLITS = ("train", "val", "test")
FASHION_POOLS = {"fashion-train": "train_classes", "fashion-heldout": "eval_classes"}
META_TRAIN_POOLS = ("omniglot-train", "fashion-train")
TUNING_POOLS = ("omniglot-val", "fashion-train")
EVAL_POOLS = ("omniglot-test", "fashion-heldout")
VALIDATION_SEED, TUNING_SEED = 1_000_000, 2_000_000  # seed ranges of the gate's and the lr grid's tasks


def build_pools(op: Any, omniglot: dict[str, tuple[np.ndarray, np.ndarray]],
                fashion: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, ImagePool]:
    """Pools from raw arrays: Omniglot splits as uint8 [M, S, S] with 255 = paper (prepared layout),
    Fashion-MNIST 'train' / 'test' as uint8 [M, 28, 28] with 0 = background (the IDX files)."""
    pools = {}
    for split in OMNIGLOT_SPLITS:
        images, labels = omniglot[split]
        pools[f"omniglot-{split}"] = ImagePool.split_per_class(
            f"omniglot-{split}", 255 - images, labels, op.omniglot.test_per_class)  # ink -> 255, like Fashion-MNIST
    for name, field in FASHION_POOLS.items():
        classes = list(getattr(op.fashion, field))
        (train_x, train_y), (test_x, test_y) = fashion["train"], fashion["test"]
        keep_train, keep_test = np.isin(train_y, classes), np.isin(test_y, classes)
        pools[name] = ImagePool(name, train_x[keep_train], train_y[keep_train], test_x[keep_test], test_y[keep_test])
    return pools


def load_pools(op: Any, prepared: Path, project_root: Path) -> dict[str, ImagePool]:
    """The real pools: prepared Omniglot splits and the Fashion-MNIST IDX files (found as `fashion.source` says)."""
    from metaflowlib.data.fashion_mnist import load_fashion_mnist
    from metaflowlib.data.store import load_split

    omniglot = {split: load_split(prepared, split) for split in OMNIGLOT_SPLITS}
    data = load_fashion_mnist(op.fashion.source, project_root, verify=op.fashion.verify_checksums)
    fashion = {split: (data[split].images, data[split].labels) for split in ("train", "test")}
    return build_pools(op, omniglot, fashion)


def family(op: Any, pool: ImagePool, arch: str) -> TaskFamily:
    shape = op.omniglot if pool.name.startswith("omniglot") else op.fashion
    return TaskFamily(pool, arch, shape.ways, shape.train_per_class, shape.test_per_class, op.batch_size, op.hidden,
                      op.image_size)


def meta_training_distribution(op: Any, pools: dict[str, ImagePool], device: torch.device | str = "cpu"
                               ) -> TaskDistribution:
    return TaskDistribution([family(op, pools[p], arch) for p in META_TRAIN_POOLS for arch in op.models], device)


def task_set(op: Any, pools: dict[str, ImagePool], pool_names: tuple[str, ...], archs: tuple[str, ...], tasks: int,
             first_seed: int, device: torch.device | str = "cpu") -> dict[str, list[ClassifierTask]]:
    """{'<pool>/<arch>': tasks with seeds first_seed, first_seed + 1, ...}."""
    out = {}
    for p in pool_names:
        for arch in archs:
            fam = family(op, pools[p], arch)
            out[fam.name] = [make_task(fam, first_seed + i, device) for i in range(tasks)]
    return out


def validation_tasks(op: Any, pools: dict[str, ImagePool], device: torch.device | str = "cpu") -> list[ClassifierTask]:
    """The registry gate's tasks: held out of meta-training by classes (Omniglot val) or by seeds."""
    sets = task_set(op, pools, TUNING_POOLS, tuple(op.models), op.meta_train.validation_tasks, VALIDATION_SEED, device)
    return [task for tasks in sets.values() for task in tasks]


def tuning_tasks(op: Any, pools: dict[str, ImagePool], device: torch.device | str = "cpu") -> list[ClassifierTask]:
    """The baselines' lr grids are scored here, never on the evaluation tasks."""
    sets = task_set(op, pools, TUNING_POOLS, tuple(op.models), op.evaluate.tuning_tasks, TUNING_SEED, device)
    return [task for tasks in sets.values() for task in tasks]


def evaluation_suites(op: Any, pools: dict[str, ImagePool], device: torch.device | str = "cpu"
                      ) -> dict[str, list[ClassifierTask]]:
    archs = (*op.models, op.evaluate.unseen_model)
    return task_set(op, pools, EVAL_POOLS, archs, op.evaluate.tasks, op.evaluate.seed, device)
