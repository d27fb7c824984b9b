"""The optimizee task distribution of the learned optimizer: small classifiers trained from scratch.

Andrychowicz et al. meta-train on one problem family (an MNIST MLP); the
issue asks for a distribution: a task is drawn from a family (which images,
which architecture) and a seed, which picks the N classes, the examples, the
optimizee's initialization theta_0 and its minibatch order. The same seed
gives the same task, so every optimizer compared on it sees the same theta_0
and the same minibatches.

Images come as an `ImagePool` of class-disjoint uint8 arrays (0 = background),
each class with a train part (what the optimizee is trained on) and a test
part (its test accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaflowlib.errors import DataError
from metaflowlib.learned_optimizer.meta_train import OptimizeeTask

ARCHITECTURES = ("mlp", "conv", "mlp2")


def build_optimizee(arch: str, image_size: int, ways: int, hidden: int) -> nn.Module:
    """A freshly initialized optimizee (draws from torch's global RNG).

    mlp: one sigmoid hidden layer (the paper's MNIST optimizee); conv: two
    stride-2 ReLU conv layers, global pooling, linear head (as `classifier_task`);
    mlp2: two ReLU hidden layers, the architecture held out of meta-training
    (depth and activation the LSTM never saw on an MLP; the paper's Fig. 5 probes the same).
    """
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(image_size**2, hidden), nn.Sigmoid(), nn.Linear(hidden, ways))
    if arch == "conv":
        return nn.Sequential(
            nn.Conv2d(1, hidden // 2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, ways),
        )
    if arch == "mlp2":
        return nn.Sequential(nn.Flatten(), nn.Linear(image_size**2, hidden), nn.ReLU(),
                             nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, ways))
    raise ValueError(f"optimizee architecture must be one of {ARCHITECTURES}, got {arch!r}")


@dataclass(frozen=True)
class ImagePool:
    """Class-disjoint images: uint8 [M, S, S] (0 = background) with int labels [M], a train and a test part.

    Every class of `classes` must have examples in both parts.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: np.ndarray = field(init=False)
    _train_index: dict[int, np.ndarray] = field(init=False, repr=False)
    _test_index: dict[int, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        classes = np.unique(self.train_labels)
        if not np.array_equal(classes, np.unique(self.test_labels)):
            raise DataError(f"pool {self.name}: the train and test parts hold different classes")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "_train_index", _index_by_class(self.train_labels))
        object.__setattr__(self, "_test_index", _index_by_class(self.test_labels))

    @classmethod
    def split_per_class(cls, name: str, images: np.ndarray, labels: np.ndarray, test_per_class: int) -> ImagePool:
        """Keep the last `test_per_class` examples of every class apart as its test part (Omniglot: drawers)."""
        test = np.zeros(len(labels), dtype=bool)
        for index in _index_by_class(labels).values():
            if len(index) <= test_per_class:
                raise DataError(f"pool {name}: a class has {len(index)} examples, need more than {test_per_class}")
            test[index[-test_per_class:]] = True
        return cls(name, images[~test], labels[~test], images[test], labels[test])

    def sample(self, ways: int, train_per_class: int, test_per_class: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(train images, train labels, test images, test labels) of `ways` random classes relabelled 0..ways-1."""
        if ways > len(self.classes):
            raise DataError(f"pool {self.name} has {len(self.classes)} classes, a task needs {ways}")
        chosen = rng.choice(self.classes, ways, replace=False)
        parts = []
        for index, images, per_class in ((self._train_index, self.train_images, train_per_class),
                                         (self._test_index, self.test_images, test_per_class)):
            picks = []
            for c in chosen:
                if len(index[int(c)]) < per_class:
                    raise DataError(f"pool {self.name}: class {c} has {len(index[int(c)])} examples, a task needs {per_class}")
                picks.append(rng.choice(index[int(c)], per_class, replace=False))
            parts += [images[np.concatenate(picks)], np.repeat(np.arange(ways), per_class)]
        return parts[0], parts[1], parts[2], parts[3]


def _index_by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return {int(c): order[s:e] for c, s, e in zip(classes, starts, list(starts[1:]) + [len(order)])}


@dataclass(frozen=True)
class TaskFamily:
    """Which pool and architecture, and the task's shape: N ways, examples per class, minibatch size."""

    pool: ImagePool
    arch: str
    ways: int
    train_per_class: int
    test_per_class: int
    batch_size: int = 64
    hidden: int = 20
    image_size: int = 28

    @property
    def name(self) -> str:
        return f"{self.pool.name}/{self.arch}"


@dataclass(frozen=True)
class ClassifierTask:
    """One optimizee task: what optimizers train (`optimizee`) and how its parameters are scored."""

    name: str
    optimizee: OptimizeeTask
    model: nn.Module
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @torch.no_grad()
    def train_loss(self, params: Mapping[str, Tensor]) -> float:
        """Cross-entropy on the whole training set (the minibatch losses along the way are noisy)."""
        return float(F.cross_entropy(functional_call(self.model, dict(params), (self.train_x,)), self.train_y))

    @torch.no_grad()
    def test_accuracy(self, params: Mapping[str, Tensor]) -> float:
        logits = functional_call(self.model, dict(params), (self.test_x,))
        return float((logits.argmax(-1) == self.test_y).float().mean())


def to_input(images: np.ndarray, size: int, device: torch.device | str = "cpu") -> Tensor:
    """uint8 [N, H, W] (0 = background) -> float [N, 1, size, size] in [0, 1], area-resized."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).float()[:, None] / 255.0
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def make_task(family: TaskFamily, seed: int, device: torch.device | str = "cpu") -> ClassifierTask:
    """The task `seed` of `family`: classes, examples, theta_0 and minibatches all follow from the seed."""
    rng = np.random.default_rng(seed)
    xs, ys, xt, yt = family.pool.sample(family.ways, family.train_per_class, family.test_per_class, rng)
    train_x, test_x = to_input(xs, family.image_size, device), to_input(xt, family.image_size, device)
    train_y, test_y = torch.from_numpy(ys).to(device), torch.from_numpy(yt).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_optimizee(family.arch, family.image_size, family.ways, family.hidden).to(device)
    params = {name: p.detach() for name, p in model.named_parameters()}
    n, batch = len(train_y), family.batch_size

    def loss(p: Mapping[str, Tensor], t: int) -> Tensor:
        if batch >= n:
            xb, yb = train_x, train_y
        else:  # step t's minibatch depends on (seed, t) only: every optimizer sees the same sequence
            generator = torch.Generator().manual_seed(seed * 1_000_003 + t)
            idx = torch.randint(n, (batch,), generator=generator).to(device)
            xb, yb = train_x[idx], train_y[idx]
        return F.cross_entropy(functional_call(model, dict(p), (xb,)), yb)

    return ClassifierTask(f"{family.name}#{seed}", OptimizeeTask(params, loss), model, train_x, train_y, test_x, test_y)


class TaskDistribution:
    """Families drawn uniformly: `task(seed)` is the meta-training `task_factory` (seed -> OptimizeeTask)."""

    def __init__(self, families: list[TaskFamily], device: torch.device | str = "cpu") -> None:
        if not families:
            raise ValueError("a task distribution needs at least one family")
        self.families, self.device = families, device

    def family(self, seed: int) -> TaskFamily:
        return self.families[seed % len(self.families)]

    def classifier_task(self, seed: int) -> ClassifierTask:
        return make_task(self.family(seed), seed, self.device)

    def __call__(self, seed: int) -> OptimizeeTask:
        return self.classifier_task(seed).optimizee
