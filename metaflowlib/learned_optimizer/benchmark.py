"""Optimizers compared on held-out optimizee tasks: loss and accuracy curves, horizons, step cost, learning-rate grids.

Every optimizer runs once per task for the longest horizon; shorter horizons
are read off the same trajectory (no schedule depends on the run's length).
All optimizers of a task start from the same theta_0 and see the same
minibatches. A run whose full training loss stops being finite or exceeds
`divergence_factor` times its initial loss is cut there and counted as
diverged: its later points are missing, never made up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metaflowlib.errors import DivergenceError
from metaflowlib.learned_optimizer.suites import evaluation_suites, tuning_tasks, validation_tasks
from metaflowlib.learned_optimizer.tasks import ClassifierTask, ImagePool
from metaflowlib.methods.inner_optimizers import SGD, Adam, InnerOptimizer

ADAM_DEFAULT_LR = 1e-3  # Kingma & Ba's default


@dataclass(frozen=True)
class Trajectory:
    """Full training loss and test accuracy at `steps`; `diverged_at` is the first bad step or None."""

    steps: list[int]
    train_loss: list[float]
    test_accuracy: list[float]
    diverged_at: int | None
    update_ms: float  # the optimizer's step alone, mean over steps
    step_ms: float  # gradient + update, mean over steps

    def at(self, step: int) -> tuple[float, float] | None:
        """(train loss, test accuracy) at a recorded step, None if the run diverged before it."""
        if self.diverged_at is not None and self.diverged_at <= step:
            return None
        i = self.steps.index(step)
        return self.train_loss[i], self.test_accuracy[i]


def run_trajectory(task: ClassifierTask, optimizer: InnerOptimizer, steps: int, record_every: int,
                   divergence_factor: float = 1e3) -> Trajectory:
    """Train task's optimizee for `steps` updates, scoring it every `record_every` steps (and at 0 and the end)."""
    if steps < 1 or record_every < 1:
        raise ValueError(f"need steps >= 1 and record_every >= 1, got {steps} and {record_every}")
    params = {name: p.detach().requires_grad_() for name, p in task.optimizee.params.items()}
    state = optimizer.init(params)
    initial = task.train_loss(params)
    steps_at, losses, accuracies = [0], [initial], [task.test_accuracy(params)]
    update_s = total_s = 0.0
    diverged_at = None
    for t in range(steps):
        start = time.perf_counter()
        loss = task.optimizee.loss(params, t)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        before_update = time.perf_counter()
        with torch.no_grad():
            params, state = optimizer.step(params, grads, state)
        params = {name: p.detach().requires_grad_() for name, p in params.items()}
        end = time.perf_counter()
        update_s, total_s = update_s + end - before_update, total_s + end - start
        if not math.isfinite(float(loss.detach())):
            diverged_at = t
            break
        if (t + 1) % record_every == 0 or t + 1 == steps:
            value = task.train_loss(params)
            if not (math.isfinite(value) and value <= divergence_factor * initial):
                diverged_at = t + 1
                break
            steps_at.append(t + 1)
            losses.append(value)
            accuracies.append(task.test_accuracy(params))
    done = max(1, t + 1)
    return Trajectory(steps_at, losses, accuracies, diverged_at, 1000 * update_s / done, 1000 * total_s / done)


def tune_lr(make: Callable[[float], InnerOptimizer], lrs: list[float], tasks: list[ClassifierTask], steps: int,
            divergence_factor: float = 1e3) -> tuple[float, dict[float, float]]:
    """The lr of the grid with the lowest mean final training loss on `tasks` (a divergence counts as inf)."""
    scores = {}
    for lr in lrs:
        finals = []
        for task in tasks:
            run = run_trajectory(task, make(lr), steps, record_every=steps, divergence_factor=divergence_factor)
            finals.append(math.inf if run.diverged_at is not None else run.train_loss[-1])
        scores[lr] = float(np.mean(finals))
    best = min(scores, key=lambda lr: scores[lr])
    if not math.isfinite(scores[best]):
        raise DivergenceError(f"every lr of the grid {lrs} diverged on the {len(tasks)} tuning tasks: widen the grid")
    return best, scores


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def summarize(runs: list[Trajectory], checkpoints: Mapping[str, int]) -> dict:
    """Mean and std over tasks at each named checkpoint, the mean curve, the step costs, the divergences."""
    at = {}
    for label, step in checkpoints.items():
        points = [p for p in (r.at(step) for r in runs) if p is not None]
        loss, acc = _stats([p[0] for p in points]), _stats([p[1] for p in points])
        at[label] = {"step": step, "train_loss_mean": loss["mean"], "train_loss_std": loss["std"],
                     "test_accuracy_mean": acc["mean"], "test_accuracy_std": acc["std"],
                     "diverged": len(runs) - len(points), "tasks": len(runs)}
    curve = []
    for step in sorted({s for r in runs for s in r.steps}):
        points = [p for p in (r.at(step) if step in r.steps else None for r in runs) if p is not None]
        loss, acc = _stats([p[0] for p in points]), _stats([p[1] for p in points])
        curve.append({"step": step, "train_loss_mean": loss["mean"], "train_loss_std": loss["std"],
                      "test_accuracy_mean": acc["mean"], "test_accuracy_std": acc["std"], "tasks": len(points)})
    return {"at": at, "curve": curve, "update_ms": float(np.mean([r.update_ms for r in runs])),
            "step_ms": float(np.mean([r.step_ms for r in runs]))}


def compare(optimizers: Mapping[str, InnerOptimizer], suites: Mapping[str, list[ClassifierTask]], steps: int,
            record_every: int, divergence_factor: float = 1e3, progress: Callable[[str], None] | None = None
            ) -> dict[str, dict[str, list[Trajectory]]]:
    """{suite: {optimizer: one trajectory of `steps` updates per task}}."""
    runs: dict[str, dict[str, list[Trajectory]]] = {}
    for suite, tasks in suites.items():
        runs[suite] = {}
        for name, optimizer in optimizers.items():
            started = time.perf_counter()
            runs[suite][name] = [run_trajectory(task, optimizer, steps, record_every, divergence_factor) for task in tasks]
            if progress is not None:
                final = [r.train_loss[-1] for r in runs[suite][name] if r.diverged_at is None]
                diverged = len(tasks) - len(final)
                progress(f"{suite} {name}: final train loss {_fmt(float(np.mean(final)) if final else None)}, "
                         f"{diverged}/{len(tasks)} diverged ({time.perf_counter() - started:.0f}s)")
    return runs


def evaluation_report(runs: Mapping[str, Mapping[str, list[Trajectory]]], horizon: int, multiples: list[int],
                      groups: Mapping[str, list[str]]) -> dict:
    """Summaries at `multiples` x `horizon` per suite and pooled over the suites of each group (e.g. seen / unseen)."""
    checkpoints = {f"{m}x": m * horizon for m in multiples}
    report = {"suites": {suite: {name: summarize(r, checkpoints) for name, r in by_opt.items()}
                         for suite, by_opt in runs.items()}}
    report["pooled"] = {}
    for group, suites in groups.items():
        names = runs[suites[0]].keys() if suites else []
        report["pooled"][group] = {name: summarize([t for s in suites for t in runs[s][name]], checkpoints)
                                   for name in names}
    return report


def evaluate_against_baselines(op: Any, learned: InnerOptimizer, pools: dict[str, ImagePool], device: torch.device,
                               progress: Callable[[str], None] = print) -> dict:
    """The `optimizer_eval` protocol: Adam's and SGD-with-momentum's learning rates chosen on separate tuning tasks at
    the meta-training horizon H, then `learned`, Adam (default and tuned) and SGD run on every evaluation suite for
    max(horizons) x H steps; summaries at each multiple of H, per suite and pooled over seen / unseen architectures.
    `op` is params' `optimizer` section."""
    e, horizon, factor = op.evaluate, op.meta_train.horizon, op.meta_train.divergence_factor
    tuning = tuning_tasks(op, pools, device)
    adam_lr, adam_scores = tune_lr(Adam, list(e.adam_lrs), tuning, horizon, factor)
    sgd_lr, sgd_scores = tune_lr(lambda lr: SGD(lr, e.momentum), list(e.sgd_lrs), tuning, horizon, factor)
    progress(f"tuned on {len(tuning)} tasks at {horizon} steps: Adam lr {adam_lr:g}, SGD(momentum {e.momentum:g}) lr {sgd_lr:g}")
    optimizers = {"learned": learned, "adam_default": Adam(ADAM_DEFAULT_LR), "adam_tuned": Adam(adam_lr),
                  "sgd_momentum": SGD(sgd_lr, e.momentum)}
    suites = evaluation_suites(op, pools, device)
    runs = compare(optimizers, suites, horizon * max(e.horizons), e.record_every, factor, progress=progress)
    seen = [s for s in suites if s.split("/")[1] in op.models]
    report = evaluation_report(runs, horizon, sorted(e.horizons), {"seen": seen, "unseen": [s for s in suites if s not in seen]})
    keyed = lambda scores: {f"{lr:g}": value for lr, value in scores.items()}  # noqa: E731
    return report | {"horizon": horizon, "multiples": sorted(e.horizons), "tasks_per_suite": e.tasks,
                     "lr": {"adam_default": ADAM_DEFAULT_LR, "adam_tuned": adam_lr, "sgd_momentum": sgd_lr}, "momentum": e.momentum,
                     "tuning": {"tasks": len(tuning), "adam": keyed(adam_scores), "sgd_momentum": keyed(sgd_scores)}}


def validation_loss_drop(op: Any, net: InnerOptimizer, pools: dict[str, ImagePool], device: torch.device) -> float:
    """Mean 1 - final / initial training loss after the meta-training horizon on the validation tasks (the registry's
    gate metric: higher is better); a divergence there refuses the optimizer like one in meta-training."""
    mt = op.meta_train
    drops = []
    for task in validation_tasks(op, pools, device):
        run = run_trajectory(task, net, mt.horizon, record_every=mt.horizon, divergence_factor=mt.divergence_factor)
        if run.diverged_at is not None:
            raise DivergenceError(f"the meta-trained optimizer diverged on validation task {task.name} at optimizee "
                                  f"step {run.diverged_at} (loss not finite or above {mt.divergence_factor:g} x initial)")
        drops.append(1 - run.train_loss[-1] / run.train_loss[0])
    return sum(drops) / len(drops)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
