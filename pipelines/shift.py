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

from _stage import PREPARED, ROOT, declared, method_key, params, run_guarded
from _production import recorded

from metaflowlib import tracking
from metaflowlib.config.shift import ShiftParams
from metaflowlib.data.store import load_split
from metaflowlib.io import write_json
from metaflowlib.runtime import resolve_device, seed_everything
from metaflowlib.serving.fewshot import FewShotModel
from metaflowlib.serving.log import unwrap_registered
from metaflowlib.tta.fewshot import evaluate_under_shift


def main() -> None:
    import mlflow

    p, key = params(shift=ShiftParams), method_key()
    s = p.shift
    device = resolve_device(p.device)
    seed_everything(p.seed)
    tracking.configure(p.mlflow.tracking_uri)
    production = recorded(p, ROOT, "shift", key)[key]
    model = unwrap_registered(production["uri"], FewShotModel)
    method = model.method.to(device).eval()
    ways, shots = p.settings_of(s.setting)
    images, labels = load_split(PREPARED, "test")
    shifted = evaluate_under_shift(method, images, labels, image_format=model.format, corruptions=s.corruptions,
                                   severity=s.severity, ways=ways, shots=shots, queries=s.queries, tasks=s.tasks, seed=s.seed,
                                   tent_steps=s.tent.steps, tent_lr=s.tent.lr, device=device,
                                   report=lambda line: print(f"shift@{key} {line}", flush=True))
    results, summary = shifted["results"], shifted["summary"]
    report = {"model": {"name": production["name"], "version": production["version"], "run_id": production["run_id"]},
              "setting": s.setting, "severity": s.severity, "tasks": s.tasks, "episodes_digest": shifted["episodes_digest"],
              "summary": summary, "accuracy": {k: {c: r["accuracy"] for c, r in v.items()} for k, v in results.items()}}
    tags = {"method_key": key, "method": method.kind, "adapted_model": production["name"], "adapted_version": production["version"]}
    with tracking.stage_run(p, f"shift@{key}", f"{key}-shift", tags=tags, device=device, params={
            "setting": s.setting, "severity": s.severity, "tasks": s.tasks, "tent_steps": s.tent.steps, "tent_lr": s.tent.lr}) as run:
        mlflow.log_metrics({f"acc_{k}_{c}": r["accuracy"] for k, v in results.items() for c, r in v.items()}
                           | {f"{k}_{m}": v for k, row in summary.items() for m, v in row.items()})
        mlflow.log_dict(report, "shift/report.json")
    metrics = declared("shift", "metrics/*", item=key)
    write_json(ROOT / metrics, report)
    write_json(ROOT / declared("shift", "runs/*", item=key), {"run_id": run.info.run_id, "model": report["model"]})
    shown = ", ".join(f"{k} {100 * v['clean']:.1f} -> {100 * v['mean_corrupted']:.1f}" for k, v in summary.items())
    print(f"shift@{key}: {production['name']} v{production['version']}, {s.setting} clean -> mean over {len(s.corruptions)} "
          f"corruptions (severity {s.severity}): {shown} (%); {metrics}")


if __name__ == "__main__":
    run_guarded(main)
