"""Stage `tta@<strategy>`: adapt the production classifier on every corruption x severity of the shifted set.

Reads production/tta.json (the versions `production_tta` resolved from
the `production` alias) and data/tta/fashion-mnist-c/. Outputs, under
metrics/tta/strategies/ and runs/tta/strategies/: `<key>.json` (DVC metrics:
error per corruption and severity, mean per severity, clean error, cost),
`<key>.csv` (DVC plot: mean error vs severity, 0 = clean), and the MLflow run,
tagged with the model name and version it adapted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _stage import ROOT, declared, params, run_guarded
from _production import LEARNED, recorded

from metaflowlib import tracking
from metaflowlib.config import Params
from metaflowlib.config.learned_optimizer import LearnedOptimizerParams
from metaflowlib.config.tta import TTAParams
from metaflowlib.io import write_csv, write_json
from metaflowlib.runtime import resolve_device, seed_everything
from metaflowlib.serving.classifier import ClassifierModel
from metaflowlib.serving.log import unwrap_registered
from metaflowlib.tta.benchmark import adapter_options, evaluate_strategy
from metaflowlib.tta.shifted import load_shifted



def run(p: Params, key: str, root: Path) -> dict:
    """Evaluate strategy `key`, write its outputs under `root`, log its MLflow run; returns the metrics."""
    import mlflow
    import torch

    strategy = p.tta.strategy(key)
    tracking.configure(p.mlflow.tracking_uri)  # `recorded` checks the versions against the registry
    references = recorded(p, root, "tta")
    reference = references[strategy.model]
    device = resolve_device(p.device)
    model = unwrap_registered(reference["uri"], ClassifierModel).model
    model = model.to(device)
    if p.tta.channels_last:
        model = model.to(memory_format=torch.channels_last)
    shifted = load_shifted(root / declared("tta", "data/*"))
    seed_everything(p.tta.seed)
    learned = None
    if getattr(strategy, "optimizer", None) == "learned":
        from metaflowlib.serving.learned_optimizer import LearnedOptimizerModel

        learned = unwrap_registered(references[LEARNED]["uri"], LearnedOptimizerModel).net.to(device).eval()
    result = evaluate_strategy(strategy.kind, model, adapter_options(strategy, learned), shifted, strategy.batch_size, device,
                               p.tta.channels_last)
    metrics = result.metrics()
    tags = {"strategy": key, "kind": strategy.kind, "model_name": reference["name"],
            "model_version": reference["version"], "model_run_id": reference["run_id"],
            **({"optimizer_model": references[LEARNED]["name"], "optimizer_version": references[LEARNED]["version"]} if learned is not None else {}),
            "data_digest": shifted.info["digest"], "memory_kind": result.memory_kind}
    logged = {"strategy": strategy.model_dump(mode="json"), "images": len(shifted.labels), "seed": p.tta.seed,
              "channels_last": p.tta.channels_last}
    with tracking.stage_run(p, f"tta@{key}", f"tta@{key}", tags=tags, params=logged, device=device,
                            experiment=p.tta.experiment) as mlflow_run:
        flat = {f"error_{c}_s{s}": e for c, by in metrics["error"].items() for s, e in by.items()}
        flat.update({f"mean_error_s{s}": e for s, e in metrics["mean_error"].items()})
        flat.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
        mlflow.log_metrics(flat)
    write_json(root / declared("tta", "metrics/*.json", key=key), metrics)
    write_csv(root / declared("tta", "metrics/*.csv", key=key),  # mean error per severity, 0 being the clean images
              [{"severity": 0, "mean_error": metrics["error_clean"]}, *({"severity": int(s), "mean_error": e} for s, e in metrics["mean_error"].items())],
              ["severity", "mean_error"])
    write_json(root / declared("tta", "runs/*", key=key), {"run_id": mlflow_run.info.run_id, "experiment_id": mlflow_run.info.experiment_id,
                                            "strategy": strategy.model_dump(mode="json"), "name": reference["name"],
                                            "version": reference["version"], "model_run_id": reference["run_id"],
                                            "model_uri": reference["uri"], "memory_kind": result.memory_kind})
    return metrics


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {Path(sys.argv[0]).name} <strategy key from params.yaml tta.strategies>")
    p, key = params(tta=TTAParams, optimizer=LearnedOptimizerParams), sys.argv[1]
    metrics = run(p, key, ROOT)
    worst = max(metrics["mean_error"], key=int)
    print(f"tta@{key}: mean error {100 * metrics['mean_error'][worst]:.1f}% at severity {worst} "
          f"({100 * metrics['mean_error_all']:.1f}% over severities, clean {100 * metrics['error_clean']:.1f}%), "
          f"{metrics['ms_per_batch']:.1f} ms per batch of {p.tta.strategy(key).batch_size}")


if __name__ == "__main__":
    run_guarded(main)
