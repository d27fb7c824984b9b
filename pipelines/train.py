"""Stage `train@<method>`: meta-train omega, log the run to MLflow, save omega and its pyfunc model.

Outputs: models/<key>/ (omega: safetensors + JSON), runs/<key>/train.json
(run id, model URI, costs), metrics/<key>/train_curve.csv. An interrupted run
resumes from checkpoints/<key>/ into the same MLflow run when the params match.
With train.launcher.kind torchrun (or when started by torchrun) the ranks share each
meta-batch; rank 0 alone tracks and writes (docs/distributed.md).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
from _stage import PREPARED, ROOT, Checkpoints, method_key, params, run_guarded

from metaflowlib import distributed, tracking
from metaflowlib.artifacts import load_meta_knowledge, save_meta_knowledge
from metaflowlib.config import Params
from metaflowlib.config.methods import method_spec
from metaflowlib.data.store import load_info, load_pool
from metaflowlib.episodes import EpisodeSampler, fixed_episodes
from metaflowlib.errors import DataError, Interrupted
from metaflowlib.evaluate import embed_pool, evaluate_setting
from metaflowlib.io import atomic_path, read_json, write_json
from metaflowlib.runtime import resolve_device, resolve_precision, seed_everything
from metaflowlib.serving.fewshot import log_pyfunc_model
from metaflowlib.train import MetaTrainer, build_meta_optimizer


def validator(pool, p: Params, dtype):
    """omega -> accuracy on fixed validation tasks (the same tasks at every validation).

    A frozen feature map's validation features are computed once.
    """
    v = p.train.validation
    cached = {}

    def validate(method) -> float:
        method.eval()
        features = None
        if method.per_example_features:
            if not method.frozen_features or "features" not in cached:
                cached["features"] = embed_pool(method, pool, dtype)
            features = cached["features"]
        ways = method.fixed_ways or v.ways  # a fixed N-way head is validated on N-way tasks
        return evaluate_setting(method, pool, features, ways, v.shots, v.queries, v.episodes, p.seed + 1,
                                p.evaluate.batch_tasks, dtype).accuracy

    return validate


def diagnoser(pool, mp, seed: int):
    """omega -> the method's `diagnostics` on 8 fixed validation tasks of its own training shape."""
    episode = pool.gather(fixed_episodes(pool, 8, mp.ways, mp.shots, mp.queries, seed))
    return lambda method: method.diagnostics(episode)


def trained_for(p: Params, key: str, pretrained: dict) -> dict:
    """What a checkpoint was trained for: resuming under other params or another feature map starts afresh."""
    return {"method": method_spec(p, key).flat(), "data": p.data.model_dump(mode="json"),
            "seed": p.seed, "profile": p.profile, "train": p.train.model_dump(mode="json"),
            "pretrained": pretrained.get("weights_sha256")}


def main() -> None:
    p, key = params(), method_key()
    if p.train.launcher.kind == "torchrun" and not distributed.launched():
        relaunch(key, p.train.launcher.nproc_per_node, method_spec(p, key).tasks_per_step)
    device = resolve_device(p.device)
    group = distributed.init_from_env(device)
    try:
        train(p, key, device if group is None else group.device, group)
    finally:
        distributed.shutdown()


def relaunch(key: str, nproc_per_node: int, tasks_per_step: int) -> NoReturn:
    """Become torchrun running this stage on nproc_per_node processes: the same process, so the
    signals DVC or a user sends reach torchrun, which forwards them to every rank."""
    distributed.shard_tasks(tasks_per_step, nproc_per_node, f"methods.{key}.tasks_per_step")  # refuse once, up front
    sys.stdout.flush()
    sys.stderr.flush()
    command = distributed.torchrun_command(Path(__file__).resolve(), [key], nproc_per_node)
    os.execv(command[0], command)


def train(p: Params, key: str, device: torch.device, group: distributed.Distributed | None) -> None:
    import mlflow

    mp = method_spec(p, key)
    budget = mp.budget_in(p.profile)
    dtype = resolve_precision(p.train.precision, device)
    seed_everything(p.seed)

    info = load_info(PREPARED)
    train_pool = load_pool(PREPARED, "train", p.data.image_size, device)
    val_pool = load_pool(PREPARED, "val", p.data.image_size, device)
    method = mp.build(p.data.image_size).to(device)
    pretrained = load_pretrained(method, key)
    if p.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if method.frozen_features:  # meta-training never moves the feature map: embed the split once
        method.eval()
        train_pool = embed_pool(method, train_pool, dtype)
    tasks, seed = mp.tasks_per_step, p.seed
    if group is not None:  # each rank its share of the meta-batch, from its own task stream
        tasks, seed = group.shard(tasks, f"methods.{key}.tasks_per_step"), p.seed + group.rank
    sampler = EpisodeSampler(train_pool, mp.ways, mp.shots, mp.queries, tasks, seed=seed)
    optimizer, scheduler = build_meta_optimizer(method, **mp.meta_optimizer.model_dump(exclude={"grad_clip"}),
                                                total_steps=budget.episodes)

    checkpoints = Checkpoints.of(ROOT, key, trained_for(p, key, pretrained))

    def trainer(log: tracking.MetricLogger | None, progress: str) -> MetaTrainer:
        return MetaTrainer(
            method, sampler, optimizer, scheduler, validate=validator(val_pool, p, dtype), val_every=mp.val_every or p.train.val_every,
            max_episodes=budget.episodes, max_seconds=budget.seconds, checkpoint_dir=checkpoints.state,
            checkpoint_every=p.train.checkpoint_every, log=log, precision=dtype,
            grad_clip=mp.meta_optimizer.grad_clip, progress=progress, distributed=group,
            diagnose=diagnoser(val_pool, mp, p.seed + 2),
        )

    if group is not None and not group.is_main:  # a worker rank: its share of every step, no tracking, no files
        trainer(None, "off").run()
        return

    run_id = checkpoints.resume_run_id()
    tracking.configure(p.mlflow.tracking_uri)
    tags = {"method": mp.kind, "method_key": key, "stage": f"train@{key}", "profile": p.profile,
            "dataset": p.data.name, "data_digest": hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16],
            **tracking.system_tags(device), **({"processes": str(group.world_size)} if group else {})}
    progress = p.train.progress if p.train.progress != "auto" else ("bar" if sys.stderr.isatty() else "log")
    with tracking.start_run(p.experiment, p.mlflow.artifact_location, key, tags, run_id=run_id) as run:
        if run_id is None:
            mlflow.log_params(tracking.flatten_params({"method": mp.flat(), "data": p.data.model_dump(mode="json"),
                                                        "train": p.train.model_dump(mode="json"), "seed": p.seed, "profile": p.profile,
                                                        "budget": budget.model_dump(mode="json")}))
        tracking.log_splits(PREPARED, {"train": "training", "val": "validation"})
        checkpoints.started(run.info.run_id)
        try:
            result = trainer(tracking.MetricLogger(run.info.run_id), progress).run()
        except Interrupted:
            mlflow.end_run(status="KILLED")
            raise
        costs = {"meta_train_seconds": result.seconds, "meta_train_episodes": result.episodes,
                 "episodes_per_second": result.episodes_per_second, "peak_memory_mb": result.peak_memory_mb,
                 "best_val_accuracy": result.best_val_accuracy, "best_episode": result.best_episode,
                 "meta_parameters": sum(t.numel() for t in method.parameters() if t.requires_grad)}
        feature_map = {}
        if pretrained.get("pretrained"):
            costs |= {k: pretrained[k] for k in ("pretrain_seconds", "pretrain_peak_memory_mb")}
            feature_map = {"feature_map": {k: pretrained[k] for k in ("registered_name", "registered_version", "run_id", "weights_sha256")}}
            mlflow.set_tags({"feature_map_model": pretrained["registered_name"], "feature_map_version": pretrained["registered_version"]})
        capped = budget.seconds is not None and result.episodes < budget.episodes
        if capped:
            mlflow.set_tag("budget_capped", f"{result.episodes} of {budget.episodes} episodes in the {budget.seconds:g}s cap")
            print(f"warning: train@{key} hit its {budget.seconds:g}s cap after {result.episodes} of {budget.episodes} episodes; "
                  "the result depends on this machine's speed (MLflow tag budget_capped)", file=sys.stderr, flush=True)
        mlflow.log_metrics(costs)
        mlflow.set_tag("memory_kind", result.memory_kind)
        omega_dir = save_meta_knowledge(method, ROOT / "models" / key, extra={
            "image_size": p.data.image_size, "method_key": key, "dataset": p.data.name, "run_id": run.info.run_id})
        model_uri = log_pyfunc_model(omega_dir, ways=method.fixed_ways or 2)
        write_curve(ROOT / "metrics" / key / "train_curve.csv", result.history)
        write_json(ROOT / "runs" / key / "train.json", {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                                        "model_uri": model_uri, "memory_kind": result.memory_kind, "budget_capped": capped,
                                                        **costs, **feature_map})
    checkpoints.remove()
    print(f"train@{key}: {result.episodes} episodes in {result.seconds:.0f}s ({result.episodes_per_second:.2f} ep/s), "
          f"best val {result.best_val_accuracy:.4f}; omega in models/{key}/, MLflow run {run.info.run_id}, "
          f"runs table {tracking.ui_link(run.info.experiment_id)}")


def load_pretrained(method, key: str) -> dict:
    """Load the `pretrain@<key>` feature map into a method that starts from one; its record (or {})."""
    if method.pretrained_module is None:
        return {}
    record_path = ROOT / "runs" / key / "pretrain.json"
    if not record_path.is_file() or not read_json(record_path).get("pretrained"):
        raise DataError(f"{method.kind} starts from a pre-trained {method.pretrained_module}, and pretrained/{key} has none: "
                        f"run `dvc repro pretrain@{key}` (and check that methods.{key} has a pretrain block)")
    embedding, _ = load_meta_knowledge(ROOT / "pretrained" / key)
    getattr(method, method.pretrained_module).load_state_dict(embedding.embedding.state_dict())
    return read_json(record_path)


def write_curve(path, history: list[dict]) -> None:
    """One row per logged step; a method's diagnostics (at validations) follow the standard columns."""
    fields = ["episode", "train_loss", "train_accuracy", "val_accuracy", "lr"]
    fields += sorted({key for row in history for key in row} - set(fields))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


if __name__ == "__main__":
    run_guarded(main)
