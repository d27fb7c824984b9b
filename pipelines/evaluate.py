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

import csv

from _stage import PREPARED, ROOT, method_key, params, run_guarded

from metaflowlib import tracking
from metaflowlib.artifacts import load_meta_knowledge
from metaflowlib.data.store import load_pool, log_splits
from metaflowlib.evaluate import evaluate_protocol
from metaflowlib.io import atomic_path, read_json, write_json
from metaflowlib.runtime import resolve_device, resolve_precision, seed_everything


def flat_metrics(report: dict, train: dict) -> dict[str, float]:
    """The numbers a reader compares: acc/ci per setting plus the costs of getting there."""
    out = {}
    for name, result in report["settings"].items():
        out[f"acc_{name}"] = result["accuracy"]
        out[f"ci95_{name}"] = result["ci95"]
    for shots, result in report["shots_curve"].items():
        out[f"curve_acc_5w{shots}s"] = result["accuracy"]
    out["adaptation_ms_per_task"] = 1000 * report["adaptation_seconds_per_task"]
    for key in ("meta_train_seconds", "peak_memory_mb", "episodes_per_second", "meta_parameters"):
        out[key] = train[key]
    if "pretrain_seconds" in train:  # a method built on a pre-trained feature map: its cost counts too
        out["pretrain_seconds"] = train["pretrain_seconds"]
    return out


# from the training run: searchable together (memory_kind: what the peak_memory_mb copied here measured)
INHERITED_TAGS = ("method", "method_key", "profile", "dataset", "data_digest", "git_commit", "memory_kind")
PER_TASK = "evaluation/per_task"


def configurations(report: dict) -> dict[str, dict]:
    """Every distinct configuration scored: the settings, then the shots-curve points they did not already score."""
    out = dict(report["settings"])
    seen = {result["digest"] for result in out.values()}
    for result in report["shots_curve"].values():
        if result["digest"] not in seen:
            out[f"{result['ways']}w{result['shots']}s"] = result
            seen.add(result["digest"])
    return out


def child_runs(report: dict, tags: dict[str, str]) -> dict[str, tuple[dict[str, str], dict[str, float]]]:
    """Run name -> (tags, metrics) of the nested run per configuration: the evaluation run's tags (so a search by
    method, profile or data digest finds them) and which tasks were scored."""
    return {
        f"evaluate/{name}": ({**tags, "setting": name, "ways": str(r["ways"]), "shots": str(r["shots"]),
                              "queries": str(r["queries"]), "episodes": str(r["episodes"]), "episodes_digest": r["digest"]},
                             {"accuracy": r["accuracy"], "ci95": r["ci95"]})
        for name, r in configurations(report).items()
    }


def main() -> None:
    import mlflow

    p, key = params(), method_key()
    e = p.evaluate
    device = resolve_device(p.device)
    dtype = resolve_precision(p.train.precision, device)
    seed_everything(p.seed)
    train = read_json(ROOT / "runs" / key / "train.json")
    method, _ = load_meta_knowledge(ROOT / "models" / key, device)
    pool = load_pool(PREPARED, "test", p.data.image_size, device)
    report = evaluate_protocol(
        method, pool, p.settings(), episodes=e.episodes, queries=e.queries, seed=e.seed, batch_tasks=e.batch_tasks,
        dtype=dtype, shots_curve=e.shots_curve, timing_tasks=e.timing_tasks,
    )
    per_task = report.pop("task_accuracies")
    metrics = flat_metrics(report, train)
    digests = {name: r["digest"] for name, r in report["settings"].items()}

    tracking.configure(p.mlflow.tracking_uri)
    training = mlflow.get_run(train["run_id"])
    model_id = train["model_uri"].removeprefix("models:/")
    tags = ({k: training.data.tags[k] for k in INHERITED_TAGS if k in training.data.tags}
            | {"stage": f"evaluate@{key}", "evaluated_run_id": train["run_id"], "evaluated_model_id": model_id}
            | {f"episodes_digest_{name}": d[:16] for name, d in digests.items()} | tracking.system_tags(device))
    with tracking.start_run(p.experiment, p.mlflow.artifact_location, f"{key}-evaluate", tags) as run:
        mlflow.log_params(tracking.flatten_params({"evaluate": e.model_dump(mode="json"), "precision": p.train.precision}))
        log_splits(PREPARED, {"test": "testing"})
        mlflow.log_metrics(metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith(("acc_", "ci95_"))}, model_id=model_id)
        mlflow.log_dict(report, "evaluation/report.json")
        for name, accuracies in per_task.items():
            mlflow.log_dict({"setting": name, "episodes_digest": digests[name], "task_accuracies": accuracies},
                            f"{PER_TASK}/{name}.json")
        children = tracking.log_child_runs(run.info.run_id, f"evaluate@{key}", child_runs(report, tags))
    superseded = tracking.supersede(run.info.run_id, {"stage": f"evaluate@{key}", "evaluated_run_id": train["run_id"]})

    write_json(ROOT / "metrics" / key / "eval.json", {**metrics, "episodes": e.episodes, "episodes_digest": digests})
    with atomic_path(ROOT / "metrics" / key / "shots_curve.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["shots", "accuracy", "ci95"])
        for shots, result in report["shots_curve"].items():
            writer.writerow([shots, result["accuracy"], result["ci95"]])
    write_json(ROOT / "runs" / key / "evaluate.json", {"run_id": run.info.run_id, "evaluated_run_id": train["run_id"],
                                                       "child_runs": children, "superseded": superseded,
                                                       "episodes_digest": digests, "skipped_settings": report["skipped_settings"]})
    shown = "  ".join(f"{n} {100 * r['accuracy']:.2f}±{100 * r['ci95']:.2f}" for n, r in report["settings"].items())
    skipped = f"; skipped {', '.join(report['skipped_settings'])} (fixed {method.fixed_ways}-way head)" if report["skipped_settings"] else ""
    print(f"evaluate@{key}: {shown} (%, {e.episodes} tasks each){skipped}; metrics/{key}/eval.json, MLflow run {run.info.run_id} "
          f"with {len(children)} nested runs" + (f" ({len(superseded)} earlier runs tagged superseded_by)" if superseded else ""))


if __name__ == "__main__":
    run_guarded(main)
