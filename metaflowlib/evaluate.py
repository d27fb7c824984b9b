"""The one evaluation protocol: fixed test tasks, accuracy +- 95% CI, adaptation cost.

Every method is scored on the same tasks: `fixed_episodes` draws them from
the test split's class layout and a seed, and their digest is recorded next
to the numbers. Per-example methods (ProtoNet, parameter prediction) embed
the split once; each task is then built from cached features, which gives the
same numbers as embedding each task's images (BatchNorm in eval mode is
per-example) at a fraction of the cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from metaflowlib.episodes import EpisodeIndices, TaskPool, fixed_episodes
from metaflowlib.methods import MetaLearner
from metaflowlib.progress import phase, track
from metaflowlib.runtime import autocast, synchronize


@dataclass(frozen=True)
class SettingResult:
    """Accuracy over the fixed tasks of one (ways, shots) setting."""

    ways: int
    shots: int
    queries: int
    episodes: int
    accuracy: float
    ci95: float
    digest: str
    task_accuracies: tuple[float, ...] = field(repr=False, compare=False)  # per fixed task, in order: for paired tests

    def as_dict(self) -> dict:
        """The summary (the per-task accuracies are stored apart: a thousand numbers per setting)."""
        out = asdict(self)
        del out["task_accuracies"]
        return out


def confidence_interval(accuracies: Tensor) -> tuple[float, float]:
    """Mean and the 95% half-width 1.96 * std / sqrt(n) (Snell et al.'s protocol)."""
    n = accuracies.numel()
    std = float(accuracies.std()) if n > 1 else 0.0
    return float(accuracies.mean()), 1.96 * std / math.sqrt(n)


@torch.no_grad()
def embed_pool(method: MetaLearner, pool: TaskPool, dtype: torch.dtype | None, batch: int = 2048) -> TaskPool:
    """The pool with every example replaced by `method.features(x)` (eval mode)."""
    device = pool.examples.device
    chunks = []
    with autocast(device, method.precision(dtype)):
        for start in range(0, pool.examples.shape[0], batch):
            chunks.append(method.features(pool.examples[start : start + batch]).float())
    return pool.with_examples(torch.cat(chunks))


def task_accuracies(method: MetaLearner, pool: TaskPool, indices: EpisodeIndices, batch_tasks: int, dtype: torch.dtype | None,
                    label: str = "tasks") -> Tensor:
    """Query accuracy of each task [T]: adapt on the support set, predict the queries (progress: `label`)."""
    device = pool.examples.device
    out = []
    with torch.no_grad(), autocast(device, method.precision(dtype)):
        for batch in track(indices.batches(batch_tasks), f"{label}, batches of {batch_tasks} tasks"):
            episode = pool.gather(batch)
            theta = method.adapt(episode.support_x, episode.support_y, episode.ways)
            logits = method.predict(theta, episode.query_x)
            out.append((logits.argmax(-1) == episode.query_y).float().mean(1).cpu())
    return torch.cat(out)


def evaluate_setting(
    method: MetaLearner, pool: TaskPool, features: TaskPool | None, ways: int, shots: int, queries: int,
    episodes: int, seed: int, batch_tasks: int, dtype: torch.dtype | None,
) -> SettingResult:
    indices = fixed_episodes(pool, episodes, ways, shots, queries, seed)
    accuracies = task_accuracies(method, features or pool, indices, batch_tasks, dtype, f"scoring {ways}-way {shots}-shot, {episodes} tasks")
    mean, ci = confidence_interval(accuracies)
    return SettingResult(ways, shots, queries, episodes, mean, ci, indices.digest(), tuple(accuracies.tolist()))


def adaptation_seconds(method: MetaLearner, pool: TaskPool, ways: int, shots: int, tasks: int, seed: int, dtype: torch.dtype | None) -> float:
    """Median wall time to go from one task's raw support images to theta_i (features + adapt)."""
    phase(f"timing adaptation on {tasks} tasks")
    device = pool.examples.device
    indices = fixed_episodes(pool, tasks + 1, ways, shots, 1, seed)
    times = []
    with torch.no_grad(), autocast(device, method.precision(dtype)):
        for i, batch in enumerate(indices.batches(1)):
            episode = pool.gather(batch)
            synchronize(device)
            start = time.perf_counter()
            support = episode.support_x
            if method.per_example_features:
                support = method.features(support[0])[None]
            method.adapt(support, episode.support_y, ways)
            synchronize(device)
            if i > 0:  # the first task warms up kernels and allocators
                times.append(time.perf_counter() - start)
    return float(torch.tensor(times).median())


def evaluate_protocol(
    method: MetaLearner, pool: TaskPool, settings: dict[str, tuple[int, int]], *, episodes: int, queries: int,
    seed: int, batch_tasks: int = 50, dtype: torch.dtype | None = None, shots_curve: tuple[int, ...] = (),
    curve_ways: int = 5, timing_tasks: int = 100,
) -> dict:
    """Scores for each setting (and each one's per-task accuracies), the accuracy-vs-shots curve, and per-task
    adaptation time.

    A method with a fixed N-way head is scored on the N-way settings only (the
    others are listed under `skipped_settings`), and its shots curve is N-way.
    """
    method.eval()
    if method.per_example_features:
        phase(f"embedding {len(pool.examples)} test images")
    features = embed_pool(method, pool, dtype) if method.per_example_features else None
    min_count = int(pool.counts.min())
    fixed = method.fixed_ways
    usable = {name: shape for name, shape in settings.items() if fixed is None or shape[0] == fixed}
    if not usable:
        raise ValueError(f"{method.kind} has a {fixed}-way head and none of the settings {sorted(settings)} is {fixed}-way")
    curve_ways = fixed or curve_ways
    results = {
        name: evaluate_setting(method, pool, features, ways, shots, min(queries, min_count - shots), episodes, seed, batch_tasks, dtype)
        for name, (ways, shots) in usable.items()
    }
    by_shape = {(r.ways, r.shots): r for r in results.values()}
    curve = {
        shots: by_shape.get((curve_ways, shots))  # a point the settings already scored is reused, not re-run
        or evaluate_setting(method, pool, features, curve_ways, shots, min(queries, min_count - shots), episodes, seed, batch_tasks, dtype)
        for shots in shots_curve
        if shots < min_count
    }
    first_ways, first_shots = next(iter(usable.values()))
    return {
        "settings": {k: v.as_dict() for k, v in results.items()},
        "task_accuracies": {k: list(v.task_accuracies) for k, v in results.items()},
        "skipped_settings": sorted(set(settings) - set(usable)),
        "shots_curve": {str(k): v.as_dict() for k, v in curve.items()},
        "adaptation_seconds_per_task": adaptation_seconds(method, pool, first_ways, first_shots, timing_tasks, seed, dtype),
    }
