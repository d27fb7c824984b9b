"""Stage `tta_source`: train the source classifier and its TTT twin on Fashion-MNIST train; register both.

Outputs: models/tta/{source,ttt}/ (safetensors + JSON), runs/tta/source.json
(MLflow runs, registered versions), metrics/tta/clean.json (clean test
accuracy, training cost). Registered as `<tta.model_prefix>-source` and
`-ttt`, gated on clean test accuracy; the first version of each is promoted
when none is in production and `registry.promote_first` is set. An interrupted
run resumes from checkpoints/tta_source/<kind>/ into the same MLflow run when the
params match; a classifier already registered by it is not trained again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _stage import ROOT, Checkpoints, declared, params, run_guarded

from metaflowlib import registry, tracking
from metaflowlib.config import Params
from metaflowlib.config.tta import TTAParams
from metaflowlib.data.fashion_mnist import CLASSES, load_fashion_mnist
from metaflowlib.io import read_json, write_json
from metaflowlib.runtime import resolve_device, resolve_precision, seed_everything
from metaflowlib.serving.classifier import log_classifier_model
from metaflowlib.tta.classifier import (
    KINDS,
    accuracy,
    build_classifier,
    save_classifier,
    train_classifier,
)

MODELS, RUNS_FILE, CLEAN_METRICS = (declared("tta_source", pattern) for pattern in ("models/*", "runs/*", "metrics/*"))
GATE_METRIC = "acc_clean"  # registry tag: a new version must beat production's clean test accuracy
CHECKPOINT_EVERY = 200  # minibatches between checkpoints: about an epoch of 60000 images at the params' batch size
IMAGE_SIZE = 28
DESCRIPTIONS = {
    "source": "Conv-4 + BatchNorm classifier trained on cross-entropy: the model the source, bn and tent strategies adapt",
    "ttt": "Conv-4 + BatchNorm trained on main + rotation-prediction loss (Sun et al. 2020): the model the ttt strategy adapts",
}


def train_and_register(p: Params, root: Path) -> dict:
    """Train, log, save and register both classifiers; returns what runs/tta/source.json records."""
    import mlflow

    t = p.tta.training
    device = resolve_device(p.device)
    dtype = resolve_precision(t.precision, device)
    data = load_fashion_mnist(p.tta.data.source, root, verify=p.tta.data.verify_checksums)
    images, labels = data["train"].images, data["train"].labels
    if t.train_images is not None:
        keep = np.random.default_rng(p.tta.seed).permutation(len(labels))[: t.train_images]
        images, labels = images[keep], labels[keep]
    out, trained = {}, []
    for kind in KINDS:
        checkpoints = Checkpoints.of(root, f"tta_source/{kind}", {
            "training": t.model_dump(mode="json"), "kind": kind, "seed": p.tta.seed, "channels_last": p.tta.channels_last,
            "data": p.tta.data.source, "train_images": len(labels), "registered_name": p.tta.registered_name(kind)})
        trained.append(checkpoints)
        run_id, done = checkpoints.resume_run_id(), checkpoints.directory / "registered.json"
        if run_id is not None and done.is_file():  # trained and registered before the interruption
            out[kind] = read_json(done)
            continue
        seed_everything(p.tta.seed)  # the twin starts from the same seed and sees the same batches
        config = {"num_classes": len(CLASSES), "image_size": IMAGE_SIZE, "hidden": t.hidden,
                  **({"shared_blocks": t.shared_blocks} if kind == "ttt" else {})}
        model = build_classifier(kind, **config).to(device)
        if p.tta.channels_last:
            model = model.to(memory_format=torch.channels_last)
        logged = {"training": t.model_dump(mode="json"), "kind": kind, "seed": p.tta.seed, "train_images": len(labels)}
        with tracking.stage_run(p, "tta_source", f"tta_source@{kind}", tags={"kind": kind, "dataset": "fashion-mnist"},
                                params=logged, device=device, experiment=p.tta.experiment, run_id=run_id) as run:
            checkpoints.started(run.info.run_id)
            result = train_classifier(model, kind, images, labels, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                                      seed=p.tta.seed, device=device, dtype=dtype, channels_last=p.tta.channels_last,
                                      log=tracking.MetricLogger(run.info.run_id), checkpoint_dir=checkpoints.state,
                                      checkpoint_every=CHECKPOINT_EVERY, progress=True)
            clean = accuracy(model, data["test"].images, data["test"].labels, device)
            costs = {GATE_METRIC: clean, "train_seconds": result.seconds, "train_steps": result.steps}
            mlflow.log_metrics(costs)
            directory = save_classifier(model, root / MODELS / kind, kind, config, extra={"run_id": run.info.run_id})
            model_uri = log_classifier_model(directory, IMAGE_SIZE, tent=p.serving.tent_classifier.model_dump())
        name = p.tta.registered_name(kind)
        version, promoted = registry.register_stage_version(
            model_uri, name,
            {GATE_METRIC: clean, registry.GATE_TAG: GATE_METRIC, "protocol": "fashion-mnist", "kind": kind,
             "git_commit": tracking.git_commit()},
            f"{kind} classifier, {t.epochs} epochs on {len(labels)} Fashion-MNIST train images; clean test accuracy {clean:.4f}",
            DESCRIPTIONS[kind] + "; predict({'images': uint8 [N, 28, 28]}) -> labels, probabilities",
            GATE_METRIC, p.registry.promote_first,
        )
        out[kind] = {"name": name, "version": version.version, "run_id": run.info.run_id, "model_uri": model_uri,
                     "promoted": promoted is not None, **costs}
        write_json(done, out[kind])
    write_json(root / RUNS_FILE, out)
    write_json(root / CLEAN_METRICS, {kind: {k: v[k] for k in (GATE_METRIC, "train_seconds")} for kind, v in out.items()})
    for checkpoints in trained:
        checkpoints.remove()
    return out


def main() -> None:
    out = train_and_register(params(tta=TTAParams), ROOT)
    shown = "; ".join(f"{v['name']} v{v['version']} clean acc {v[GATE_METRIC]:.4f} ({v['train_seconds']:.0f}s)"
                      + (" promoted" if v["promoted"] else "") for v in out.values())
    print(f"tta_source: {shown}")


if __name__ == "__main__":
    run_guarded(main)
