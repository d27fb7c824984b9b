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

from _stage import PREPARED, ROOT, declared, params, run_guarded
from _production import LEARNED, recorded

from metaflowlib import tracking
from metaflowlib.config import Params
from metaflowlib.config.learned_optimizer import LearnedOptimizerParams
from metaflowlib.io import atomic_path, write_json
from metaflowlib.learned_optimizer.benchmark import evaluate_against_baselines
from metaflowlib.learned_optimizer.suites import load_pools
from metaflowlib.learned_optimizer.tasks import ImagePool
from metaflowlib.report.learned_optimizer import flat_metrics, markdown, plot, write_curves
from metaflowlib.runtime import resolve_device, seed_everything

OUT = {name: declared("optimizer_eval", f"*/{name}")
       for name in ("report.json", "curves.csv", "summary.md", "curves.png", "eval.json", "evaluate.json")}


def evaluate_production(p: Params, root: Path, pools: dict[str, ImagePool],
                        progress: Callable[[str], None] = print) -> dict:
    """Evaluate the production learned optimizer against the baselines, write and log the report; returns eval.json's content."""
    import mlflow

    from metaflowlib.serving.learned_optimizer import LearnedOptimizerModel
    from metaflowlib.serving.log import unwrap_registered

    op = p.optimizer
    device = resolve_device(p.device)
    seed_everything(op.seed)
    tracking.configure(p.mlflow.tracking_uri)  # `recorded` checks the version against the registry
    info = recorded(p, root, "optimizer")[LEARNED]
    name, version = info["name"], info["version"]
    net = unwrap_registered(info["uri"], LearnedOptimizerModel).net.to(device)
    report = evaluate_against_baselines(op, net, pools, device, progress=lambda line: progress(f"optimizer_eval: {line}"))
    report |= {"model": name, "version": version, "model_run_id": info["run_id"]}
    lr, e = report["lr"], op.evaluate
    header = [(f"Evaluated **{name} v{version}** (MLflow run {info['run_id']}). Meta-training horizon "
              f"H = {report['horizon']} optimizee steps; {e.tasks} held-out tasks per suite; mean ± std over tasks of the full "
              f"training loss and the test accuracy at each multiple of H. Adam default lr {lr['adam_default']:g}; "
              f"tuned on {report['tuning']['tasks']} separate tasks at H: Adam lr {lr['adam_tuned']:g}, SGD momentum "
              f"{e.momentum:g} lr {lr['sgd_momentum']:g}. 'update ms': the optimizer's step alone; 'step ms': gradient + update.")]
    titles = {"seen": f"Architectures seen in meta-training ({', '.join(op.models)}), pooled over both pools",
              "unseen": f"Unseen architecture ({e.unseen_model}), pooled over both pools"}
    write_json(root / OUT["report.json"], report)
    write_curves(report, root / OUT["curves.csv"])
    with atomic_path(root / OUT["summary.md"]) as tmp:
        tmp.write_text(markdown(report, header, titles))
    plot(report, report["horizon"], root / OUT["curves.png"])
    tags = {"evaluated_model": name, "evaluated_version": version, "evaluated_run_id": info["run_id"]}
    with tracking.stage_run(p, "optimizer_eval", "optimizer_eval", tags=tags, device=device,
                            params={"evaluate": e.model_dump(mode="json"), "lr": lr}) as run:
        mlflow.log_metrics({k: float(v) for k, v in flat_metrics(report).items()})
        for path in ("report.json", "curves.csv", "summary.md", "curves.png"):
            mlflow.log_artifact(str(root / OUT[path]), "evaluation")
    metrics = without_curves(report) | {"eval_run_id": run.info.run_id}
    write_json(root / OUT["eval.json"], metrics)
    write_json(root / OUT["evaluate.json"], {"run_id": run.info.run_id, "model": name, "version": version})
    return metrics


def without_curves(report: dict) -> dict:
    """The report less its curves: eval.json keeps the numbers a `dvc metrics diff` compares."""
    out = copy.deepcopy(report)
    for by_optimizer in (*out["pooled"].values(), *out["suites"].values()):
        for summary in by_optimizer.values():
            del summary["curve"]
    return out


def main() -> None:
    p = params(optimizer=LearnedOptimizerParams)
    metrics = evaluate_production(p, ROOT, load_pools(p.optimizer, PREPARED, ROOT))
    seen = metrics["pooled"]["seen"]
    h = f"{min(metrics['multiples'])}x"
    shown = ", ".join(f"{name} {s['at'][h]['train_loss_mean']:.4f}" for name, s in seen.items())
    print(f"optimizer_eval: {metrics['model']} v{metrics['version']}: train loss at {h} (seen architectures) {shown}; "
          f"{OUT['eval.json']}, {OUT['summary.md'].parent}/, MLflow run {metrics['eval_run_id']}")


if __name__ == "__main__":
    run_guarded(main)
