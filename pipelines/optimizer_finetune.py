"""Stage `optimizer_finetune`: the production learned optimizer drives a MAML-family model's test-time fine-tuning.

For each method in `optimizer.finetune.methods` (production versions), the
same fixed test tasks are adapted on their support sets by the model's own
inner-loop SGD (alpha and steps as trained) and by the learned LSTM optimizer
(the same number of steps, then `finetune.learned_steps`); the query accuracy
of each is compared. Reads the versions `production_finetune` recorded
(production/finetune.json). Outputs: metrics/learned_optimizer/finetune.json
(DVC metrics), runs/learned_optimizer/finetune.json (the MLflow run, tagged
with every model version it used).
"""

from __future__ import annotations

import time

from _stage import PREPARED, ROOT, declared, params, run_guarded
from _production import LEARNED, recorded

from metaflowlib import tracking
from metaflowlib.config.learned_optimizer import LearnedOptimizerParams
from metaflowlib.data.store import load_pool
from metaflowlib.episodes import fixed_episodes
from metaflowlib.errors import ConfigError
from metaflowlib.evaluate import confidence_interval, task_accuracies
from metaflowlib.io import write_json
from metaflowlib.runtime import resolve_device, seed_everything
from metaflowlib.serving.fewshot import FewShotModel
from metaflowlib.serving.learned_optimizer import LearnedOptimizerModel
from metaflowlib.serving.log import unwrap_registered


def score(method, pool, indices) -> dict[str, float]:
    start = time.perf_counter()
    accuracies = task_accuracies(method, pool, indices, 1, None)
    mean, ci = confidence_interval(accuracies)
    return {"accuracy": mean, "ci95": ci, "seconds_per_task": (time.perf_counter() - start) / len(accuracies)}


def main() -> None:
    import mlflow

    p = params(optimizer=LearnedOptimizerParams)
    f = p.optimizer.finetune
    device = resolve_device(p.device)
    seed_everything(p.seed)
    tracking.configure(p.mlflow.tracking_uri)
    references = recorded(p, ROOT, "finetune")
    optimizer = references[LEARNED]
    net = unwrap_registered(optimizer["uri"], LearnedOptimizerModel).net.to(device).eval()
    pool = load_pool(PREPARED, "test", device)
    ways, shots = p.settings_of(f.setting)
    report = {"optimizer": {"name": optimizer["name"], "version": optimizer["version"]}, "setting": f.setting,
              "tasks": f.tasks, "methods": {}}
    for key in f.methods:
        model = references[key]
        method = unwrap_registered(model["uri"], FewShotModel).method.to(device).eval()
        if not hasattr(method, "inner_optimizer"):
            raise ConfigError(f"optimizer.finetune.methods: {key} ({method.kind}) has no inner loop to drive")
        indices = fixed_episodes(pool, f.tasks, ways, shots, p.evaluate.queries, p.evaluate.seed)
        steps = method.inner_steps_eval
        rows = {f"sgd_{steps}_steps": score(method, pool, indices)}
        method.inner_optimizer = net  # this copy of the production model is only used here
        for learned_steps in sorted({steps, f.learned_steps}):
            method.inner_steps_eval = learned_steps
            rows[f"learned_{learned_steps}_steps"] = score(method, pool, indices)
        report["methods"][key] = {"model": {"name": model["name"], "version": model["version"]}, "inner_lr": method.config()["inner_lr"],
                                  "results": rows}
        print(f"optimizer_finetune {key}: " + "  ".join(f"{k} {100 * v['accuracy']:.2f}" for k, v in rows.items()), flush=True)
    tags = {"optimizer_model": optimizer["name"], "optimizer_version": optimizer["version"],
            **{f"model_{k}": f"{v['model']['name']} v{v['model']['version']}" for k, v in report["methods"].items()}}
    with tracking.stage_run(p, "optimizer_finetune", "optimizer-finetune", tags=tags, device=device) as run:
        mlflow.log_metrics({f"acc_{k}_{r}": v["accuracy"] for k, m in report["methods"].items() for r, v in m["results"].items()})
        mlflow.log_dict(report, "finetune.json")
    metrics = declared("optimizer_finetune", "metrics/*")
    write_json(ROOT / metrics, report)
    write_json(ROOT / declared("optimizer_finetune", "runs/*"), {"run_id": run.info.run_id, "models": references})
    print(f"optimizer_finetune: {optimizer['name']} v{optimizer['version']} on {f.tasks} {f.setting} tasks; "
          f"{metrics}, MLflow run {run.info.run_id}")


if __name__ == "__main__":
    run_guarded(main)
