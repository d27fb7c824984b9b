"""One adaptation strategy over a shifted test set: error per corruption and severity, and its cost.

Protocol (TENT's `cifar10c.py`): every corruption x severity set starts from
the source weights (`reset`), its test batches come in one fixed order, and
online strategies carry their state from batch to batch within the set.
Cost: median wall time of `predict` per test batch, peak memory above what
was in use before adapting (metaflowlib.memory's increase kinds), and the
number of parameters the strategy trains.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from metaflowlib.tta.strategies import OptimizerFactory, build_adapter
from metaflowlib.learned_optimizer.learned import LearnedOptimizer, LSTMOptimizerNet
from metaflowlib.memory import PeakMemory
from metaflowlib.progress import track
from metaflowlib.tta.classifier import to_input
from metaflowlib.tta.shifted import ShiftedSet


def optimizer_factory(name: str, lr: float, momentum: float = 0.0, learned: LSTMOptimizerNet | None = None) -> OptimizerFactory:
    """Adam (betas 0.9/0.999, TENT's), SGD (no weight decay) or the learned LSTM optimizer `learned`,
    over whatever parameters the adapter trains."""
    if name == "learned":
        if learned is None:
            raise ValueError("the 'learned' test-time optimizer needs the registered learned optimizer (none was loaded)")
        return functools.partial(LearnedOptimizer, net=learned)
    if name == "adam":
        return functools.partial(torch.optim.Adam, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    if name == "sgd":
        return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=0.0)
    raise ValueError(f"unknown test-time optimizer {name!r}; expected 'adam', 'sgd' or 'learned'")


def adapter_options(strategy: Any, learned: LSTMOptimizerNet | None = None) -> dict:
    """`build_adapter` keyword options from a `tta.strategies` block (`config.tta`); none for source and bn, which
    take no optimizer steps."""
    if not hasattr(strategy, "optimizer"):
        return {}
    options = {"episodic": strategy.episodic,
               "optimizer": optimizer_factory(strategy.optimizer, strategy.lr, strategy.momentum, learned)}
    if strategy.steps is not None:
        options["steps"] = strategy.steps
    if strategy.kind == "ttt":
        options["update_rotation_head"] = strategy.update_rotation_head
    return options


@dataclass
class StrategyResult:
    errors: dict[str, dict[int, float]]  # corruption -> severity -> error rate
    clean_error: float
    batch_ms: list[float] = field(repr=False)
    seconds: float
    peak_memory_mb: float
    memory_kind: str  # metaflowlib.memory's kind of peak_memory_mb
    adapted_parameters: int

    def mean_error(self) -> dict[int, float]:
        severities = next(iter(self.errors.values())).keys()
        return {s: float(np.mean([by_severity[s] for by_severity in self.errors.values()])) for s in severities}

    def metrics(self) -> dict:
        """The DVC metrics file: numbers only, severities as string keys."""
        means = self.mean_error()
        return {
            "error": {c: {str(s): e for s, e in by.items()} for c, by in self.errors.items()},
            "mean_error": {str(s): e for s, e in means.items()},
            "mean_error_all": float(np.mean(list(means.values()))),
            "error_clean": self.clean_error,
            "ms_per_batch": statistics.median(self.batch_ms),
            "batches": len(self.batch_ms),
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "adapted_parameters": self.adapted_parameters,
        }


def evaluate_strategy(
    kind: str,
    model: nn.Module,
    options: dict,
    shifted: ShiftedSet,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
) -> StrategyResult:
    """Adapt a copy of `model` (never modified) with strategy `kind` on every set of `shifted`.

    A set of n images is cut into ceil(n / batch_size) batches of nearly equal
    size, so no batch is left with a single image (batch statistics need two).
    """
    adapter = build_adapter(kind, model, **options)
    adapted = sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)
    labels = torch.as_tensor(shifted.labels)
    chunks = torch.arange(len(labels)).tensor_split(-(-len(labels) // batch_size))
    batch_ms: list[float] = []

    def error(images: np.ndarray, name: str) -> float:
        adapter.reset()
        wrong = 0
        for index in track(chunks, f"{kind} on {name}, batches of {batch_size} images"):
            x = to_input(images[index.numpy()], device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            start = time.perf_counter()
            predicted = adapter.predict(x).argmax(1).cpu()  # .cpu() waits for the device
            batch_ms.append(1000 * (time.perf_counter() - start))
            wrong += int((predicted != labels[index]).sum())
        return wrong / len(labels)

    with PeakMemory(device, increase=True) as memory:
        start = time.perf_counter()
        errors = {c: {s: error(shifted.images(c, s), f"{c} severity {s}") for s in shifted.severities} for c in shifted.corrupted}
        clean = error(shifted.clean, "clean images")
    return StrategyResult(errors, clean, batch_ms, time.perf_counter() - start, memory.peak_mb(), memory.kind, adapted)
