"""Stage `optimizer_eval`: the production learned optimizer vs Adam and SGD with momentum on held-out optimizee tasks.

Suites: Omniglot test classes and Fashion-MNIST `eval_classes`, each with the meta-training
architectures and one unseen architecture. Per suite and optimizer: final full training loss and
test accuracy (mean and std over tasks) at 1x, 5x, 10x the meta-training horizon, the curves, the
cost per step. Adam's and SGD's learning rates are chosen on separate tuning tasks.

Outputs: metrics/learned_optimizer/eval.json (DVC metrics), metrics/learned_optimizer/report.json
(everything, curves included), metrics/learned_optimizer/curves.csv (DVC plot),
reports/learned_optimizer/{summary.md,curves.png}, runs/learned_optimizer/evaluate.json; the same
numbers in an MLflow run tagged with the model name and version it evaluated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from _stage import PREPARED, ROOT, params, run_guarded
from production import LEARNED, recorded

from metaflowlib import tracking
from metaflowlib.config import Params
from metaflowlib.io import atomic_path, write_json
from metaflowlib.learned_optimizer.benchmark import compare, evaluation_report, tune_lr
from metaflowlib.methods.inner_optimizers import SGD, Adam
from metaflowlib.learned_optimizer.suites import evaluation_suites, load_pools, tuning_tasks
from metaflowlib.learned_optimizer.tasks import ImagePool
from metaflowlib.report.learned_optimizer import flat_metrics, markdown, plot, write_curves
from metaflowlib.runtime import resolve_device, seed_everything

METRICS = Path("metrics") / "learned_optimizer"
REPORTS = Path("reports") / "learned_optimizer"
RUN_FILE = Path("runs") / "learned_optimizer" / "evaluate.json"
ADAM_DEFAULT_LR = 1e-3  # Kingma & Ba's default


def evaluate_production(p: Params, root: Path, pools: dict[str, ImagePool],
                        progress: Callable[[str], None] = print) -> dict:
    """Tune the baselines, run every optimizer on every suite, write and log the report; returns eval.json's content."""
    import mlflow

    from metaflowlib.serving.learned_optimizer import LearnedOptimizerModel
    from metaflowlib.serving.log import unwrap_registered

    op, e, horizon = p.optimizer, p.optimizer.evaluate, p.optimizer.meta_train.horizon
    device = resolve_device(p.device)
    seed_everything(op.seed)
    tracking.configure(p.mlflow.tracking_uri)
    info = recorded(p, root, "optimizer")[LEARNED]
    name, version = info["name"], info["version"]
    net = unwrap_registered(info["uri"], LearnedOptimizerModel).net.to(device)

    tuning = tuning_tasks(op, pools, device)
    factor = op.meta_train.divergence_factor
    adam_lr, adam_scores = tune_lr(Adam, list(e.adam_lrs), tuning, horizon, factor)
    sgd_lr, sgd_scores = tune_lr(lambda lr: SGD(lr, e.momentum), list(e.sgd_lrs), tuning, horizon, factor)
    progress(f"optimizer_eval: tuned on {len(tuning)} tasks at {horizon} steps: Adam lr {adam_lr:g}, "
             f"SGD(momentum {e.momentum:g}) lr {sgd_lr:g}")
    optimizers = {"learned": net, "adam_default": Adam(ADAM_DEFAULT_LR), "adam_tuned": Adam(adam_lr),
                  "sgd_momentum": SGD(sgd_lr, e.momentum)}
    suites = evaluation_suites(op, pools, device)
    runs = compare(optimizers, suites, horizon * max(e.horizons), e.record_every, factor,
                   progress=lambda line: progress(f"optimizer_eval: {line}"))
    seen = [s for s in suites if s.split("/")[1] in op.models]
    groups = {"seen": seen, "unseen": [s for s in suites if s not in seen]}
    report = evaluation_report(runs, horizon, sorted(e.horizons), groups)
    chosen = {"adam_default": ADAM_DEFAULT_LR, "adam_tuned": adam_lr, "sgd_momentum": sgd_lr}
    context = {"model": name, "version": version, "model_run_id": info["run_id"], "horizon": horizon,
               "multiples": sorted(e.horizons), "tasks_per_suite": e.tasks, "lr": chosen, "momentum": e.momentum,
               "tuning": {"tasks": len(tuning), "adam": _keyed(adam_scores), "sgd_momentum": _keyed(sgd_scores)}}
    report |= context
    header = [(f"Evaluated **{name} v{version}** (MLflow run {info['run_id']}). Meta-training horizon "
              f"H = {horizon} optimizee steps; {e.tasks} held-out tasks per suite; mean ± std over tasks of the full "
              f"training loss and the test accuracy at each multiple of H. Adam default lr {ADAM_DEFAULT_LR:g}; "
              f"tuned on {len(tuning)} separate tasks at H: Adam lr {adam_lr:g}, SGD momentum {e.momentum:g} lr "
              f"{sgd_lr:g}. 'update ms': the optimizer's step alone; 'step ms': gradient + update.")]
    titles = {"seen": f"Architectures seen in meta-training ({', '.join(op.models)}), pooled over both pools",
              "unseen": f"Unseen architecture ({e.unseen_model}), pooled over both pools"}
    page = markdown(report, header, titles)

    write_json(root / METRICS / "report.json", report)
    write_curves(report, root / METRICS / "curves.csv")
    with atomic_path(root / REPORTS / "summary.md") as tmp:
        tmp.write_text(page)
    plot(report, horizon, root / REPORTS / "curves.png")
    tags = {"stage": "optimizer_eval", "evaluated_model": name, "evaluated_version": version,
            "evaluated_run_id": info["run_id"], **tracking.system_tags(device)}
    with tracking.start_run(p.experiment, p.mlflow.artifact_location, run_name="optimizer_eval", tags=tags) as run:
        mlflow.log_params(tracking.flatten_params({"evaluate": e.model_dump(mode="json"), "lr": chosen}))
        mlflow.log_metrics({k: float(v) for k, v in flat_metrics(report).items()})
        for path in ("report.json", "curves.csv"):
            mlflow.log_artifact(str(root / METRICS / path), "evaluation")
        for path in ("summary.md", "curves.png"):
            mlflow.log_artifact(str(root / REPORTS / path), "evaluation")
    metrics = without_curves(report) | {"eval_run_id": run.info.run_id}
    write_json(root / METRICS / "eval.json", metrics)
    write_json(root / RUN_FILE, {"run_id": run.info.run_id, "model": name, "version": version})
    return metrics


def without_curves(report: dict) -> dict:
    """The report less its curves: eval.json keeps the numbers a `dvc metrics diff` compares."""
    out = copy.deepcopy(report)
    for by_optimizer in (*out["pooled"].values(), *out["suites"].values()):
        for summary in by_optimizer.values():
            del summary["curve"]
    return out


def _keyed(scores: dict[float, float]) -> dict[str, float]:
    return {f"{lr:g}": value for lr, value in scores.items()}


def main() -> None:
    p = params()
    metrics = evaluate_production(p, ROOT, load_pools(p.optimizer, PREPARED, ROOT))
    seen = metrics["pooled"]["seen"]
    h = f"{min(metrics['multiples'])}x"
    shown = ", ".join(f"{name} {s['at'][h]['train_loss_mean']:.4f}" for name, s in seen.items())
    print(f"optimizer_eval: {metrics['model']} v{metrics['version']}: train loss at {h} (seen architectures) {shown}; "
          f"metrics/learned_optimizer/eval.json, reports/learned_optimizer/, MLflow run {metrics['eval_run_id']}")


if __name__ == "__main__":
    run_guarded(main)
