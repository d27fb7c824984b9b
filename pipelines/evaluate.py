"""Stage `evaluate@<method>`: the evaluation protocol on the test split, as DVC metrics and in the training run.

Outputs: metrics/<key>/eval.json (DVC metrics), metrics/<key>/shots_curve.csv
(DVC plot), runs/<key>/evaluate.json (what was logged where). In MLflow, every
metric goes into the training run, and each configuration scored (setting or
shots-curve point) gets a nested run `evaluate/<ways>w<shots>s` under it; a rerun
replaces those nested runs.
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


PARENT_ONLY_TAGS = ("mlflow.", "evaluated", "episodes_digest_")  # MLflow's own, and what this stage sets on the parent


def configurations(report: dict) -> dict[str, dict]:
    """Every distinct configuration scored: the settings, then the shots-curve points they did not already score."""
    out = dict(report["settings"])
    seen = {result["digest"] for result in out.values()}
    for result in report["shots_curve"].values():
        if result["digest"] not in seen:
            out[f"{result['ways']}w{result['shots']}s"] = result
            seen.add(result["digest"])
    return out


def child_runs(report: dict, parent_tags: dict[str, str], system: dict[str, str]) -> dict[str, tuple[dict[str, str], dict[str, float]]]:
    """Run name -> (tags, metrics) of the nested run per configuration: the training run's tags (so a search by method,
    profile or data digest finds them), where this stage ran, and which tasks were scored."""
    inherited = {k: v for k, v in parent_tags.items() if not k.startswith(PARENT_ONLY_TAGS)}
    return {
        f"evaluate/{name}": ({**inherited, **system, "setting": name, "ways": str(r["ways"]), "shots": str(r["shots"]),
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
    metrics = flat_metrics(report, train)
    digests = {name: r["digest"] for name, r in report["settings"].items()}

    tracking.configure(p.mlflow.tracking_uri)
    with mlflow.start_run(run_id=train["run_id"]) as run:
        mlflow.log_metrics(metrics)
        mlflow.set_tags({f"episodes_digest_{name}": d[:16] for name, d in digests.items()} | {"evaluated": "true"})
        mlflow.log_dict(report, "evaluation/report.json")
    children = tracking.replace_child_runs(train["run_id"], f"evaluate@{key}",
                                           child_runs(report, run.data.tags, tracking.system_tags(device)))

    write_json(ROOT / "metrics" / key / "eval.json", {**metrics, "episodes": e.episodes, "episodes_digest": digests})
    with atomic_path(ROOT / "metrics" / key / "shots_curve.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["shots", "accuracy", "ci95"])
        for shots, result in report["shots_curve"].items():
            writer.writerow([shots, result["accuracy"], result["ci95"]])
    write_json(ROOT / "runs" / key / "evaluate.json", {"run_id": train["run_id"], "child_runs": children, "episodes_digest": digests,
                                                       "skipped_settings": report["skipped_settings"]})
    shown = "  ".join(f"{n} {100 * r['accuracy']:.2f}±{100 * r['ci95']:.2f}" for n, r in report["settings"].items())
    skipped = f"; skipped {', '.join(report['skipped_settings'])} (fixed {method.fixed_ways}-way head)" if report["skipped_settings"] else ""
    print(f"evaluate@{key}: {shown} (%, {e.episodes} tasks each){skipped}; metrics/{key}/eval.json, MLflow run {train['run_id']} "
          f"and {len(children)} nested runs")


if __name__ == "__main__":
    run_guarded(main)
