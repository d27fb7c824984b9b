"""Stage `evaluate@<method>`: the evaluation protocol on the test split, as DVC metrics and an MLflow run of its own.

Outputs: metrics/<key>/eval.json (DVC metrics), metrics/<key>/shots_curve.csv
(DVC plot), runs/<key>/evaluate.json (what was logged where). In MLflow the
training run is never written to: the evaluation is a run `<key>-evaluate`
(tag `evaluated_run_id` names the training run) holding every metric, the
report and each setting's per-task accuracies (`evaluation/per_task/<setting>.json`,
what the promotion gate pairs), with a nested run `evaluate/<ways>w<shots>s` per
configuration scored. The accuracies are also logged to the trained model
(`model_id`), so the logged model and its registered versions show them. A
rerun keeps the earlier evaluation runs, tagged `superseded_by=<new run>`.
"""

from __future__ import annotations

import torch
from _stage import PREPARED, ROOT, declared, method_key, params, run_guarded

from metaflowlib import tracking
from metaflowlib.artifacts import load_meta_knowledge
from metaflowlib.config import Params
from metaflowlib.data.store import load_pool
from metaflowlib.evaluate import evaluate_protocol
from metaflowlib.evaluation_log import INHERITED_TAGS, flat_metrics, log_evaluation
from metaflowlib.io import read_json, write_csv, write_json
from metaflowlib.precision import Choice, recorded
from metaflowlib.runtime import resolve_device, seed_everything


def main() -> None:
    p, key = params(), method_key()
    e = p.evaluate
    device = resolve_device(p.device)
    seed_everything(p.seed)
    train = read_json(ROOT / declared("evaluate", "runs/*/train.json", key=key))
    choice = recorded(train.get("precision"), p.train.precision, p.train.channels_last, device)  # train@'s, not measured again
    dtype = choice.dtype
    method, _ = load_meta_knowledge(ROOT / declared("evaluate", "models/*", key=key), device)
    if choice.channels_last:
        method = method.to(memory_format=torch.channels_last)
    pool = load_pool(PREPARED, "test", device)
    report = evaluate_protocol(
        method, pool, p.settings(), episodes=e.tasks, queries=e.queries, seed=e.seed, batch_tasks=e.batch_tasks,
        dtype=dtype, shots_curve=e.shots_curve, timing_tasks=e.timing_tasks,
    )
    record_evaluation(p, key, f"evaluate@{key}", report, train, method.fixed_ways, device, choice)


def record_evaluation(p: Params, key: str, stage: str, report: dict, train: dict, fixed_ways: int | None,
                      device: torch.device | None, choice: Choice | None) -> None:
    """Log `report` (evaluate_protocol's) as the evaluation run of the training run `train` names, and write the
    stage's files (metrics/<key>/eval.json, shots_curve.csv, runs/<key>/evaluate.json): evaluate@ and import@ alike.
    `choice`: the precision and layout it was scored in here (None: elsewhere, as an imported run records)."""
    import mlflow

    e = p.evaluate
    per_task = report.pop("task_accuracies")
    metrics = flat_metrics(report, train)
    digests = {name: r["digest"] for name, r in report["settings"].items()}

    tracking.configure(p.mlflow.tracking_uri)
    training = mlflow.get_run(train["run_id"])
    model_id = train["model_uri"].removeprefix("models:/")
    tags = ({k: training.data.tags[k] for k in INHERITED_TAGS if k in training.data.tags}
            | {"evaluated_run_id": train["run_id"], "evaluated_model_id": model_id}
            | {f"episodes_digest_{name}": d[:16] for name, d in digests.items()})
    precision = {"precision": choice.precision, "channels_last": choice.channels_last} if choice is not None else {}
    with tracking.stage_run(p, stage, f"{key}-evaluate", tags=tags, device=device,
                            params={"evaluate": e.model_dump(mode="json"), **precision}) as run:
        if choice is not None:
            mlflow.set_tags(choice.tags())
        tracking.log_splits(PREPARED, {"test": "testing"})
        children = log_evaluation(run.info.run_id, stage, report, per_task, metrics, model_id, tracking.own_tags(run))
    superseded = tracking.supersede(run.info.run_id, {"stage": stage, "evaluated_run_id": train["run_id"]})

    eval_json = declared("evaluate", "metrics/*/eval.json", key=key)
    write_json(ROOT / eval_json, {**metrics, "tasks": e.tasks, "episodes_digest": digests})
    write_csv(ROOT / declared("evaluate", "metrics/*/shots_curve.csv", key=key),
              ({"shots": shots, "accuracy": r["accuracy"], "ci95": r["ci95"]} for shots, r in report["shots_curve"].items()),
              ["shots", "accuracy", "ci95"])
    write_json(ROOT / declared("evaluate", "runs/*/evaluate.json", key=key), {"run_id": run.info.run_id, "evaluated_run_id": train["run_id"],
                                                       "child_runs": children, "superseded": superseded,
                                                       "episodes_digest": digests, "skipped_settings": report["skipped_settings"]})
    shown = "  ".join(f"{n} {100 * r['accuracy']:.2f}±{100 * r['ci95']:.2f}" for n, r in report["settings"].items())
    skipped = f"; skipped {', '.join(report['skipped_settings'])} (fixed {fixed_ways}-way head)" if report["skipped_settings"] else ""
    precision = f"; precision {choice.describe()}" if choice is not None else ""
    print(f"{stage}: {shown} (%, {e.tasks} tasks each){skipped}{precision}; {eval_json}, MLflow run {run.info.run_id} "
          f"with {len(children)} nested runs" + (f" ({len(superseded)} earlier runs tagged superseded_by)" if superseded else ""))


if __name__ == "__main__":
    run_guarded(main)
