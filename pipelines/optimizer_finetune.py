"""Stage `optimizer_finetune`: the production learned optimizer drives a MAML-family model's test-time fine-tuning.

For each method in `optimizer.finetune.methods` (production versions), the
same fixed test tasks are adapted on their support sets by the model's own
inner-loop SGD (alpha and steps as trained) and by the learned LSTM optimizer
(the same number of steps, then `finetune.learned_steps`); the query accuracy
of each is compared. Outputs: metrics/learned_optimizer/finetune.json (DVC
metrics) and an MLflow run tagged with every model version it used.
"""

from __future__ import annotations

import time

from _stage import PREPARED, ROOT, params, run_guarded
from optimizer_eval import production


from metaflowlib import registry, tracking
from metaflowlib.data.store import load_pool
from metaflowlib.episodes import fixed_episodes
from metaflowlib.errors import ConfigError
from metaflowlib.evaluate import confidence_interval, task_accuracies
from metaflowlib.io import write_json
from metaflowlib.optim.pyfunc import load_registered
from metaflowlib.runtime import resolve_device, seed_everything
from metaflowlib.serving.log import unwrap_registered
from metaflowlib.serving.pyfunc import FewShotModel


def score(method, pool, indices) -> dict[str, float]:
    start = time.perf_counter()
    accuracies = task_accuracies(method, pool, indices, 1, None)
    mean, ci = confidence_interval(accuracies)
    return {"accuracy": mean, "ci95": ci, "seconds_per_task": (time.perf_counter() - start) / len(accuracies)}


def main() -> None:
    import mlflow

    p = params()
    f = p.optimizer.finetune
    device = resolve_device(p.device)
    seed_everything(p.seed)
    tracking.configure(p.mlflow.tracking_uri)
    optimizer_version = production(p)
    net = load_registered(f"models:/{optimizer_version.name}/{optimizer_version.version}").to(device).eval()
    pool = load_pool(PREPARED, "test", p.data.image_size, device)
    ways, shots = p.settings_of(f.setting)
    report = {"optimizer": {"name": optimizer_version.name, "version": optimizer_version.version}, "setting": f.setting,
              "tasks": f.tasks, "methods": {}}
    for key in f.methods:
        name = p.registered_name(key)
        version = registry.require_production(name)
        method = unwrap_registered(f"models:/{name}/{version.version}", FewShotModel, "a few-shot meta-model").method.to(device).eval()
        if not hasattr(method, "inner_optimizer"):
            raise ConfigError(f"optimizer.finetune.methods: {key} ({method.kind}) has no inner loop to drive")
        indices = fixed_episodes(pool, f.tasks, ways, shots, p.evaluate.queries, p.evaluate.seed)
        steps = method.inner_steps_eval
        rows = {f"sgd_{steps}_steps": score(method, pool, indices)}
        method.inner_optimizer = net  # this copy of the production model is only used here
        for learned_steps in sorted({steps, f.learned_steps}):
            method.inner_steps_eval = learned_steps
            rows[f"learned_{learned_steps}_steps"] = score(method, pool, indices)
        report["methods"][key] = {"model": {"name": name, "version": version.version}, "inner_lr": method.config()["inner_lr"],
                                  "results": rows}
        print(f"optimizer_finetune {key}: " + "  ".join(f"{k} {100 * v['accuracy']:.2f}" for k, v in rows.items()), flush=True)
    experiment = tracking.experiment_id(p.experiment, str(ROOT / p.mlflow.artifact_location))
    tags = {"stage": "optimizer_finetune", "optimizer_model": optimizer_version.name, "optimizer_version": optimizer_version.version,
            **{f"model_{k}": f"{v['model']['name']} v{v['model']['version']}" for k, v in report["methods"].items()},
            **tracking.system_tags(device)}
    with mlflow.start_run(experiment_id=experiment, run_name="optimizer-finetune", tags=tags):
        mlflow.log_metrics({f"acc_{k}_{r}": v["accuracy"] for k, m in report["methods"].items() for r, v in m["results"].items()})
        mlflow.log_dict(report, "finetune.json")
    write_json(ROOT / "metrics" / "learned_optimizer" / "finetune.json", report)
    print(f"optimizer_finetune: {optimizer_version.name} v{optimizer_version.version} on {f.tasks} {f.setting} tasks; "
          "metrics/learned_optimizer/finetune.json")


if __name__ == "__main__":
    run_guarded(main)
