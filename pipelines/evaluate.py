"""Stage `evaluate@<method>`: the evaluation protocol on the test split, as DVC metrics and in the training run.

Outputs: metrics/<key>/eval.json (DVC metrics), metrics/<key>/shots_curve.csv
(DVC plot), runs/<key>/evaluate.json (what was logged where).
"""

from __future__ import annotations

import csv

from _stage import PREPARED, ROOT, method_key, params, run_guarded

from metaflowlib import tracking
from metaflowlib.artifacts import load_meta_knowledge
from metaflowlib.data.store import load_pool
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
    metrics = flat_metrics(report, train)
    digests = {name: r["digest"] for name, r in report["settings"].items()}

    tracking.configure(p.mlflow.tracking_uri)
    with mlflow.start_run(run_id=train["run_id"]):
        mlflow.log_metrics(metrics)
        mlflow.set_tags({f"episodes_digest_{name}": d[:16] for name, d in digests.items()} | {"evaluated": "true"})
        mlflow.log_dict(report, "evaluation/report.json")

    write_json(ROOT / "metrics" / key / "eval.json", {**metrics, "episodes": e.episodes, "episodes_digest": digests})
    with atomic_path(ROOT / "metrics" / key / "shots_curve.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["shots", "accuracy", "ci95"])
        for shots, result in report["shots_curve"].items():
            writer.writerow([shots, result["accuracy"], result["ci95"]])
    write_json(ROOT / "runs" / key / "evaluate.json", {"run_id": train["run_id"], "episodes_digest": digests,
                                                       "skipped_settings": report["skipped_settings"]})
    shown = "  ".join(f"{n} {100 * r['accuracy']:.2f}±{100 * r['ci95']:.2f}" for n, r in report["settings"].items())
    skipped = f"; skipped {', '.join(report['skipped_settings'])} (fixed {method.fixed_ways}-way head)" if report["skipped_settings"] else ""
    print(f"evaluate@{key}: {shown} (%, {e.episodes} tasks each){skipped}; metrics/{key}/eval.json, MLflow run {train['run_id']}")


if __name__ == "__main__":
    run_guarded(main)
