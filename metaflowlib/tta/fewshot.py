"""Test-time adaptation of a few-shot learner, one task at a time, and the Omniglot-C protocol built on it.

For a per-example method (ProtoNet, parameter prediction) one task is a
classifier of its own: `TaskModule` embeds the task's support and query
images in one batch, adapts on the support (theta_i) and returns the query
logits. Any strategy of `metaflowlib.tta.strategies` can then wrap it, and sees
the task's images as its test batch: `bn` normalizes with the statistics of
support + query, `tent` minimizes the entropy of the query predictions over
the embedding's BatchNorm affine parameters. Each task gets a fresh adapter
(episodic: nothing carries over from one task to the next).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metaflowlib.data.corruptions import corrupt
from metaflowlib.data.preprocess import ImageFormat, to_model_input
from metaflowlib.episodes import EpisodeIndices, TaskPool, fixed_episodes
from metaflowlib.evaluate import confidence_interval, task_accuracies
from metaflowlib.methods import MetaLearner
from metaflowlib.methods.base import argmax_accuracy
from metaflowlib.progress import track
from metaflowlib.tta.strategies import build_adapter

CLEAN = "clean"


class TaskModule(nn.Module):
    """Query images [Q, C, H, W] -> logits [Q, N] for one task whose support is fixed at construction: the
    torch module a TTA strategy wraps (metaflowlib.api.TaskClassifier is the served model's, for users)."""

    def __init__(self, method: MetaLearner, support_x: Tensor, support_y: Tensor, ways: int) -> None:
        if not method.per_example_features:
            raise ValueError(f"{method.kind} adapts inside its own inner loop; only per-example methods are wrapped per task")
        super().__init__()
        self.method, self.ways = method, ways
        self.register_buffer("support_x", support_x, persistent=False)
        self.register_buffer("support_y", support_y, persistent=False)

    def forward(self, query_x: Tensor) -> Tensor:
        s = self.support_x.shape[0]
        z = self.method.features(torch.cat([self.support_x, query_x]))
        theta = self.method.adapt(z[None, :s], self.support_y[None], self.ways)
        return self.method.predict(theta, z[None, s:])[0]


def adapted_task_accuracies(
    method: MetaLearner, pool: TaskPool, indices: EpisodeIndices, strategy: str, **options: Any
) -> tuple[Tensor, float]:
    """Query accuracy of each task [T] under `strategy`, and the median seconds per task."""
    method.eval()
    accuracies, seconds = [], []
    for batch in indices.batches(1):
        episode = pool.gather(batch)
        start = time.perf_counter()
        model = TaskModule(method, episode.support_x[0], episode.support_y[0], episode.ways)
        with torch.no_grad():
            logits = build_adapter(strategy, model, **options).predict(episode.query_x[0])
        seconds.append(time.perf_counter() - start)
        accuracies.append(argmax_accuracy(logits, episode.query_y[0]))
    return torch.tensor(accuracies), float(torch.tensor(seconds).median())


def shift_result(accuracies: Tensor, seconds: float) -> dict[str, float]:
    mean, ci = confidence_interval(accuracies)
    return {"accuracy": mean, "ci95": ci, "seconds_per_task": seconds}


def strategies_for(method: MetaLearner, tent_steps: int, tent_lr: float) -> dict[str, dict[str, Any]]:
    """The test-time strategies that mean something for `method`: per-example methods (ProtoNet, parameter
    prediction) take `source`, `bn` and `tent`; the MAML family only `source`, which already fine-tunes on each
    task's support set and normalizes with its batch."""
    strategies: dict[str, dict[str, Any]] = {"source": {}}
    if method.per_example_features:
        strategies |= {"bn": {}, "tent": {"steps": tent_steps, "optimizer": functools.partial(torch.optim.Adam, lr=tent_lr)}}
    return strategies


def evaluate_under_shift(
    method: MetaLearner, images: np.ndarray, labels: np.ndarray, *, image_format: ImageFormat, corruptions: list[str], severity: int,
    ways: int, shots: int, queries: int, tasks: int, seed: int, tent_steps: int, tent_lr: float,
    device: torch.device, report: Any = print,
) -> dict[str, Any]:
    """The Omniglot-C protocol: the same `tasks` fixed test tasks, clean and under each corruption at `severity`,
    scored with every strategy of `strategies_for` (each task adapted on its own).

    Returns {"results": strategy -> corruption -> {accuracy, ci95, seconds_per_task}, "summary": strategy ->
    {clean, mean_corrupted, seconds_per_task}, "episodes_digest"}; `report` gets one line per corruption.
    """
    strategies = strategies_for(method, tent_steps, tent_lr)
    results: dict[str, dict[str, dict[str, float]]] = {strategy: {} for strategy in strategies}
    indices = None
    for corruption in track((CLEAN, *corruptions), f"corrupting the test split and adapting {tasks} tasks per strategy"):
        shifted = images if corruption == CLEAN else corrupt(images, corruption, severity, seed)
        pool = TaskPool(to_model_input(shifted, image_format).to(device), torch.from_numpy(labels), name=f"test/{corruption}")
        if indices is None:  # one class layout, so the same tasks under every corruption
            indices = fixed_episodes(pool, tasks, ways, shots, queries, seed)
        for strategy, options in strategies.items():
            if method.per_example_features:
                accuracies, seconds = adapted_task_accuracies(method, pool, indices, strategy, **options)
            else:
                start = time.perf_counter()
                accuracies = task_accuracies(method, pool, indices, 1, None)
                seconds = (time.perf_counter() - start) / tasks
            results[strategy][corruption] = shift_result(accuracies, seconds)
        report(f"{corruption}: " + "  ".join(f"{k} {100 * v[corruption]['accuracy']:.1f}" for k, v in results.items()))
    summary = {strategy: {"clean": by[CLEAN]["accuracy"],
                          "mean_corrupted": sum(by[c]["accuracy"] for c in corruptions) / len(corruptions),
                          "seconds_per_task": sum(r["seconds_per_task"] for r in by.values()) / len(by)}
               for strategy, by in results.items()}
    return {"results": results, "summary": summary, "episodes_digest": indices.digest()}
