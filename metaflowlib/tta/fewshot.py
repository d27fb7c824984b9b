"""Test-time adaptation of a few-shot learner, one task at a time.

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

import time
from typing import Any

import torch
from torch import Tensor, nn

from metaflowlib.tta.strategies import build_adapter
from metaflowlib.episodes import EpisodeIndices, TaskPool
from metaflowlib.evaluate import confidence_interval
from metaflowlib.methods import MetaLearner
from metaflowlib.methods.base import argmax_accuracy


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
