"""Stage `shift@<method>`: a production few-shot learner on corrupted test tasks (Omniglot-C).

The production version of `<dataset>-<method>` that `production_shift@<method>`
recorded (production/shift/<method>.json) is scored on the
same fixed test tasks, clean and under each corruption at one severity, with
the test-time strategies that apply to it:
- per-example methods (ProtoNet, parameter prediction): `source`, `bn`
  (BatchNorm statistics of the task's support + query images) and `tent`
  (entropy of the query predictions over BatchNorm affine), each task adapted
  on its own;
- methods with an inner loop (the MAML family): `source`, which already
  fine-tunes on each task's support set (and normalizes with its batch).

Outputs: metrics/shift/<method>.json (DVC metrics), runs/shift/<method>.json
(the MLflow run, tagged with the model name and version it adapted).
"""

from __future__ import annotations

import functools
import time

from _stage import PREPARED, ROOT, method_key, params, run_guarded
from production import recorded

import torch

from metaflowlib import tracking
from metaflowlib.tta.fewshot import adapted_task_accuracies, shift_result
from metaflowlib.data.corruptions import corrupt
from metaflowlib.data.preprocess import to_model_input
from metaflowlib.data.store import load_split
from metaflowlib.episodes import TaskPool, fixed_episodes
from metaflowlib.evaluate import task_accuracies
from metaflowlib.io import write_json
from metaflowlib.progress import phase
from metaflowlib.runtime import resolve_device, seed_everything
from metaflowlib.serving.fewshot import FewShotModel
from metaflowlib.serving.log import unwrap_registered

CLEAN = "clean"


def main() -> None:
    import mlflow

    p, key = params(), method_key()
    s = p.shift
    device = resolve_device(p.device)
    seed_everything(p.seed)
    tracking.configure(p.mlflow.tracking_uri)
    production = recorded(p, ROOT, "shift", key)[key]
    name, version = production["name"], production["version"]
    model = unwrap_registered(production["uri"], FewShotModel)
    method, size = model.method.to(device).eval(), model.image_size
    ways, shots = p.settings_of(s.setting)
    strategies = {"source": {}}
    if method.per_example_features:
        strategies |= {"bn": {}, "tent": {"steps": s.tent.steps, "optimizer": functools.partial(torch.optim.Adam, lr=s.tent.lr)}}
    images, labels = load_split(PREPARED, "test")
    results: dict[str, dict[str, dict[str, float]]] = {strategy: {} for strategy in strategies}
    indices = None
    for corruption in (CLEAN, *s.corruptions):
        phase(f"{corruption}: corrupting the test split and adapting {s.tasks} tasks per strategy")
        shifted = images if corruption == CLEAN else corrupt(images, corruption, s.severity, s.seed)
        pool = TaskPool(to_model_input(shifted, size).to(device), torch.from_numpy(labels), name=f"test/{corruption}")
        if indices is None:  # one class layout, so the same tasks under every corruption
            indices = fixed_episodes(pool, s.tasks, ways, shots, s.queries, s.seed)
        for strategy, options in strategies.items():
            if method.per_example_features:
                accuracies, seconds = adapted_task_accuracies(method, pool, indices, strategy, **options)
            else:
                start = time.perf_counter()
                accuracies = task_accuracies(method, pool, indices, 1, None)
                seconds = (time.perf_counter() - start) / s.tasks
            results[strategy][corruption] = shift_result(accuracies, seconds)
        print(f"shift@{key} {corruption}: " + "  ".join(f"{k} {100 * v[corruption]['accuracy']:.1f}" for k, v in results.items()), flush=True)

    summary = {strategy: {"clean": by[CLEAN]["accuracy"],
                          "mean_corrupted": sum(by[c]["accuracy"] for c in s.corruptions) / len(s.corruptions),
                          "seconds_per_task": sum(r["seconds_per_task"] for r in by.values()) / len(by)}
               for strategy, by in results.items()}
    report = {"model": {"name": name, "version": version, "run_id": production["run_id"]},
              "setting": s.setting, "severity": s.severity, "tasks": s.tasks, "episodes_digest": indices.digest(),
              "summary": summary, "accuracy": {k: {c: r["accuracy"] for c, r in v.items()} for k, v in results.items()}}
    tags = {"stage": f"shift@{key}", "method_key": key, "method": method.kind, "adapted_model": name,
            "adapted_version": version, **tracking.system_tags(device)}
    with tracking.start_run(p.experiment, p.mlflow.artifact_location, run_name=f"{key}-shift", tags=tags) as run:
        mlflow.log_params({"setting": s.setting, "severity": s.severity, "tasks": s.tasks, "tent_steps": s.tent.steps, "tent_lr": s.tent.lr})
        mlflow.log_metrics({f"acc_{k}_{c}": r["accuracy"] for k, v in results.items() for c, r in v.items()}
                           | {f"{k}_{m}": v for k, row in summary.items() for m, v in row.items()})
        mlflow.log_dict(report, "shift/report.json")
    write_json(ROOT / "metrics" / "shift" / f"{key}.json", report)
    write_json(ROOT / "runs" / "shift" / f"{key}.json", {"run_id": run.info.run_id, "model": report["model"]})
    shown = ", ".join(f"{k} {100 * v['clean']:.1f} -> {100 * v['mean_corrupted']:.1f}" for k, v in summary.items())
    print(f"shift@{key}: {name} v{version}, {s.setting} clean -> mean over {len(s.corruptions)} corruptions "
          f"(severity {s.severity}): {shown} (%); metrics/shift/{key}.json")


if __name__ == "__main__":
    run_guarded(main)
