"""How an evaluation is recorded in MLflow: the flat metrics a reader compares, each setting's per-task
accuracies (what the promotion gate pairs, `gate.PER_TASK`), and a nested run per configuration scored."""

from __future__ import annotations

from metaflowlib import gate, tracking


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


def log_evaluation(run_id: str, stage: str, report: dict, per_task: dict[str, list[float]], metrics: dict[str, float],
                   model_id: str, tags: dict[str, str]) -> dict[str, str]:
    """Log into the active evaluation run `run_id`: metrics (the accuracies also to the trained model `model_id`),
    the report, per-task accuracies, and the nested runs; returns their ids by name."""
    import mlflow

    mlflow.log_metrics(metrics)
    mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith(("acc_", "ci95_"))}, model_id=model_id)
    mlflow.log_dict(report, "evaluation/report.json")
    for name, accuracies in per_task.items():
        mlflow.log_dict({"setting": name, "episodes_digest": report["settings"][name]["digest"], "task_accuracies": accuracies},
                        f"{gate.PER_TASK}/{name}.json")
    return tracking.log_child_runs(run_id, stage, child_runs(report, tags))
