"""The promotion gate: does a candidate version beat production, beyond the noise of a finite test set?

Two few-shot versions scored by `evaluate@` on the same fixed tasks (equal
episodes digest) are compared task by task: the difference of their per-task
accuracies is resampled (paired bootstrap) and the candidate wins only when
the whole `confidence` interval of the mean difference lies above zero.
The numbers come from the evaluation runs (metrics and the per-task
artifact), never from version tags, which anyone can edit.

Versions evaluated before per-task accuracies were stored, and models gated
on a number that has no per-task form (a classifier's clean accuracy, a
learned optimizer's validation loss drop), fall back to the stated rule: the
candidate's point estimate, read from its run, must exceed production's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from metaflowlib.errors import RegistryError

EVALUATION_RUN_TAG = "evaluation_run_id"  # version tag set by register@: the run that scored this version
PER_TASK = "evaluation/per_task"  # artifact folder of an evaluation run: <setting>.json per setting
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Evidence:
    """What one version's run says about the gate metric."""

    version: str
    value: float | None
    task_accuracies: np.ndarray | None  # per fixed task, in the tasks' order
    digest: str | None  # the fixed tasks' episodes digest
    run_id: str
    missing: str | None = None  # why there are no per-task accuracies although the version has an evaluation run


@dataclass(frozen=True)
class Decision:
    better: bool
    message: str


def evidence(version: str, run_id: str, evaluation_run_id: str | None, metric: str) -> Evidence:
    """The gate metric of a version from its evaluation run (or, for a version registered before evaluations had
    runs of their own, its own run), and the per-task accuracies behind it when that run stored them.

    The evaluation run must say it evaluated this version's run (its `evaluated_run_id` tag): a version tag pointing
    at another model's evaluation is refused, not believed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    source = evaluation_run_id or run_id
    try:
        run = mlflow.MlflowClient().get_run(source)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise RegistryError(f"v{version}'s {'evaluation ' if evaluation_run_id else ''}run {source} does not exist "
                            "(deleted, or in another store)")
    if evaluation_run_id and run.data.tags.get("evaluated_run_id") != run_id:
        raise RegistryError(f"v{version}'s evaluation_run_id names run {source}, which evaluated run "
                            f"{run.data.tags.get('evaluated_run_id')}, not this version's run {run_id}")
    value = run.data.metrics.get(metric)
    setting = re.fullmatch(r"acc_(\d+w\d+s)", metric)
    if not (setting and evaluation_run_id):
        return Evidence(version, value, None, None, source)
    stored = _per_task(source, setting.group(1))
    if stored is None:
        return Evidence(version, value, None, None, source, missing=f"{PER_TASK}/{setting.group(1)}.json is missing from run {source}")
    return Evidence(version, value, np.asarray(stored["task_accuracies"], dtype=np.float64), stored["episodes_digest"], source)


def _per_task(run_id: str, setting: str) -> dict | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{PER_TASK}/{setting}.json")
    except (MlflowException, OSError):
        return None


def paired_bootstrap(differences: np.ndarray, confidence: float, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """Mean of `differences` and its two-sided `confidence` percentile interval from resampling the tasks."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # 1000 resamples at a time: bounded memory for any number of tasks
        stop = min(samples, start + 1000)
        means[start:stop] = differences[rng.integers(0, n, (stop - start, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(differences.mean()), float(low), float(high)


def decide(candidate: Evidence, current: Evidence, metric: str, confidence: float) -> Decision:
    """Whether `candidate` beats `current` on `metric`, with a message stating both numbers and how they were compared."""
    for side, e in (("", candidate), ("production ", current)):
        if e.value is None:
            return Decision(False, f"{side}v{e.version}'s run {e.run_id} records no {metric}, so there is nothing to compare")
        if e.missing:
            return Decision(False, f"{side}v{e.version} has an evaluation run but {e.missing}: rerun its evaluate@ stage")
    both = f"{metric} {candidate.value:.4f} vs production v{current.version}'s {current.value:.4f}"
    if candidate.task_accuracies is not None and current.task_accuracies is not None:
        if candidate.digest != current.digest or len(candidate.task_accuracies) != len(current.task_accuracies):
            return Decision(False, f"{both}: scored on different tasks ({len(candidate.task_accuracies)} with episodes digest "
                                   f"{candidate.digest[:12]}, {len(current.task_accuracies)} with {current.digest[:12]}), "
                                   "so not comparable")
        mean, low, high = paired_bootstrap(candidate.task_accuracies - current.task_accuracies, confidence)
        shown = (f"{both}: difference {mean:+.4f}, {100 * confidence:g}% interval [{low:+.4f}, {high:+.4f}] "
                 f"(paired bootstrap over {len(candidate.task_accuracies)} shared tasks)")
        return Decision(low > 0, shown)
    missing = " and ".join(f"v{e.version}" for e in (candidate, current) if e.task_accuracies is None)
    return Decision(candidate.value > current.value,
                    f"{both}: {missing} stored no per-task accuracies (evaluated before they were kept, or not a "
                    "few-shot setting), so the rule is: the candidate's point estimate must exceed production's")
