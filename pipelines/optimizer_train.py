"""Stage `optimizer_train`: meta-train the LSTM optimizer on a task distribution; save, log, register it.

Outputs: models/learned_optimizer/ (omega: safetensors + JSON), runs/learned_optimizer/train.json
(MLflow run, registered version, costs, gate metric), metrics/learned_optimizer/meta_curve.csv.
Registered as `<prefix>-<optimizer.name>` and gated on the loss drop it reaches on validation tasks;
the first version is promoted when none is in production and `registry.promote_first` is set.
A divergence (in meta-training or on the validation tasks) stops the stage: nothing is saved or registered.
An interrupted run resumes from checkpoints/learned_optimizer/ into the same MLflow run when the params match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from _stage import PREPARED, ROOT, Checkpoints, declared, params, run_guarded

from metaflowlib import registry, tracking
from metaflowlib.config import Params
from metaflowlib.config.learned_optimizer import LearnedOptimizerParams
from metaflowlib.errors import DivergenceError
from metaflowlib.io import write_csv, write_json
from metaflowlib.learned_optimizer.benchmark import validation_loss_drop
from metaflowlib.learned_optimizer.learned import LSTMOptimizerNet, save_optimizer
from metaflowlib.learned_optimizer.meta_train import meta_train_optimizer
from metaflowlib.learned_optimizer.suites import load_pools, meta_training_distribution
from metaflowlib.learned_optimizer.tasks import ImagePool
from metaflowlib.runtime import resolve_device, seed_everything

MODEL_DIR, RUN_FILE, CURVE_FILE = (declared("optimizer_train", pattern) for pattern in ("models/*", "runs/*", "metrics/*.csv"))
GATE_METRIC = "val_loss_drop"  # mean 1 - final / initial training loss on the validation tasks: higher is better
LOG_EVERY = 20  # meta-steps per progress line and per batch of MLflow metrics (their means)
CHECKPOINT_EVERY = 100  # meta-steps between checkpoints: a few seconds of work at the params' sizes


def protocol(p: Params) -> str:
    """What makes two versions' gate metrics comparable: the validation tasks and horizon, not the training knobs."""
    op = p.optimizer
    setup = {"dataset": p.data.name, "image_size": op.image_size, "hidden": op.hidden, "batch_size": op.batch_size,
             "models": op.models, "omniglot": op.omniglot.model_dump(), "horizon": op.meta_train.horizon,
             "fashion": op.fashion.model_dump(exclude={"source", "verify_checksums"}),
             "validation_tasks": op.meta_train.validation_tasks}
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:8]
    return f"{p.data.name}+fashion-mnist/h{op.meta_train.horizon}/{digest}"


def train_and_register(p: Params, root: Path, pools: dict[str, ImagePool]) -> dict:
    """Meta-train, validate, save, log and register; returns what runs/learned_optimizer/train.json records."""
    import mlflow

    from metaflowlib.serving.learned_optimizer import log_optimizer_model

    op, mt = p.optimizer, p.optimizer.meta_train
    budget = mt.budget.of(p.profile)
    device = resolve_device(p.device)
    seed_everything(op.seed)
    net = LSTMOptimizerNet(**op.net.model_dump()).to(device)
    checkpoints = Checkpoints.of(root, "learned_optimizer", {"optimizer": op.model_dump(mode="json"), "profile": p.profile,
                                                              "data": p.data.model_dump(mode="json")})
    run_id = checkpoints.resume_run_id()
    with tracking.stage_run(p, "optimizer_train", "optimizer_train", tags={"method": "learned_optimizer", "profile": p.profile,
                            "dataset": p.data.name}, params={"optimizer": op.model_dump(mode="json"), "profile": p.profile},
                            device=device, run_id=run_id) as run:
        checkpoints.started(run.info.run_id)
        try:  # truncated BPTT until the budget is spent, then the gate metric on the validation tasks
            result = meta_train_optimizer(net, meta_training_distribution(op, pools, device), steps=budget.steps,
                                          max_seconds=budget.seconds, unroll=mt.unroll, horizon=mt.horizon, lr=mt.lr,
                                          seed=op.seed, divergence_factor=mt.divergence_factor, log=tracking.MetricLogger(run.info.run_id),
                                          log_every=LOG_EVERY, checkpoint_dir=checkpoints.state, checkpoint_every=CHECKPOINT_EVERY,
                                          progress=True)
            gate = validation_loss_drop(op, net, pools, device)
        except DivergenceError as error:
            checkpoints.remove()  # a rerun from the last checkpoint would diverge the same way
            mlflow.set_tag("diverged", "true")
            raise DivergenceError(f"{error}; refusing to save or register a diverged optimizer") from None
        history = [{**row, "step": row["step"] - 1} for row in result.history]  # counted from 0, as the curve always was
        costs = {"meta_train_seconds": result.seconds, "meta_train_steps": len(history),
                 "optimizee_steps": len(history) * mt.unroll, GATE_METRIC: gate}
        mlflow.log_metrics(costs)
        tracking.note_capped(len(history), budget, "optimizer_train")
        model_uri = log_optimizer_model(save_optimizer(net, root / MODEL_DIR))
        write_csv(root / CURVE_FILE, history, ["step", "meta_loss", "loss", "task", "optimizee_step"])
        mlflow.log_artifact(str(root / CURVE_FILE), "meta_training")
    name = p.registered_name(op.name)
    version, promoted = registry.register_stage_version(
        model_uri, name,
        {GATE_METRIC: gate, registry.GATE_TAG: GATE_METRIC, "protocol": protocol(p), "kind": "lstm_optimizer",
         "meta_train_steps": len(history), "git_commit": tracking.git_commit()},
        f"LSTM optimizer meta-trained for {len(history)} meta-steps ({result.seconds:.0f}s) on {', '.join(op.models)} "
        f"classifiers of Omniglot train classes and Fashion-MNIST classes {list(op.fashion.train_classes)}; "
        f"validation loss drop at {mt.horizon} steps {gate:.4f}",
        "Learned LSTM optimizer (Andrychowicz et al. 2016): predict({'gradients': float [T, N]}) -> updates [T, N]",
        GATE_METRIC, p.registry.promote_first,
    )
    out = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "model_uri": model_uri, "name": name,
           "version": version.version, "promoted": promoted is not None, **costs}
    write_json(root / RUN_FILE, out)
    checkpoints.remove()
    return out


def main() -> None:
    p = params(optimizer=LearnedOptimizerParams)
    out = train_and_register(p, ROOT, load_pools(p.optimizer, PREPARED, ROOT))
    print(f"optimizer_train: {out['meta_train_steps']} meta-steps in {out['meta_train_seconds']:.0f}s, "
          f"{GATE_METRIC} {out[GATE_METRIC]:.4f}; {out['name']} v{out['version']}"
          + (" promoted to production" if out["promoted"] else f" (promote with `metaflowlib promote {out['name']} "
                                                                f"{out['version']}`)") + f", MLflow run {out['run_id']}")


if __name__ == "__main__":
    run_guarded(main)
