"""Stage `train@<method>`: meta-train omega, log the run to MLflow, save omega and its pyfunc model.

Outputs (dvc.yaml): models/<key>/ (omega: safetensors + JSON), runs/<key>/train.json (run id, model URI,
costs), metrics/<key>/train_curve.csv. An interrupted run resumes from checkpoints/<key>/ into the same MLflow
run when the params match. With train.launcher.kind torchrun (or under torchrun) the ranks share each
meta-batch; rank 0 alone tracks and writes (docs/distributed.md).
"""

from __future__ import annotations

import sys

import torch
from _stage import PREPARED, ROOT, Checkpoints, declared, method_key, params, run_guarded

from metaflowlib import distributed, tracking
from metaflowlib.artifacts import load_meta_knowledge, save_meta_knowledge
from metaflowlib.config import Params
from metaflowlib.config.methods import method_spec
from metaflowlib.data.store import info_digest, load_format, load_pool
from metaflowlib.episodes import EpisodeSampler
from metaflowlib.errors import DataError
from metaflowlib.evaluate import embed_pool
from metaflowlib.io import read_json, write_csv, write_json
from metaflowlib.precision import Choice, choose, meta_step_probe, probe_episode
from metaflowlib.runtime import resolve_device, seed_everything
from metaflowlib.serving.fewshot import log_pyfunc_model
from metaflowlib.train import MetaTrainer, build_meta_optimizer, diagnostics_on, validation_accuracy

CURVE = ["episode", "train_loss", "train_accuracy", "val_accuracy", "lr"]  # then the method's diagnostics


def main() -> None:
    p, key = params(), method_key()
    if p.train.launcher.kind == "torchrun" and not distributed.launched():
        distributed.relaunch(__file__, [key], p.train.launcher.nproc_per_node, method_spec(p, key).tasks_per_step,
                             f"methods.{key}.tasks_per_step")
    group = distributed.init_from_env(resolve_device(p.device))
    try:
        train(p, key, group)
    finally:
        distributed.shutdown()


def train(p: Params, key: str, group: distributed.Distributed | None) -> None:
    import mlflow

    mp, v = method_spec(p, key), p.train.validation
    device = resolve_device(p.device) if group is None else group.device
    budget = mp.budget_in(p.profile)
    seed_everything(p.seed)
    train_pool, val_pool = (load_pool(PREPARED, split, device) for split in ("train", "val"))
    fmt = load_format(PREPARED)  # the data's channels, side and normalization: the model's input
    method = mp.build(fmt.image_size, fmt.channels).to(device)
    pretrained = load_pretrained(method, key)
    tasks, seed = (mp.tasks_per_step, p.seed) if group is None else (group.shard(mp.tasks_per_step, f"methods.{key}.tasks_per_step"), p.seed + group.rank)
    checkpoints = Checkpoints.of(ROOT, key, {"method": mp.flat(), "data": p.data.model_dump(mode="json"), "seed": p.seed, "profile": p.profile,
                                            "train": p.train.model_dump(mode="json"), "pretrained": pretrained.get("weights_sha256")})
    choice = choose_precision(p, method, train_pool, checkpoints, mp.ways, mp.shots, mp.queries, tasks, device, group)
    dtype = choice.dtype
    if choice.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if method.frozen_features:  # meta-training never moves the feature map: embed the split once
        train_pool = embed_pool(method.eval(), train_pool, dtype)
    sampler = EpisodeSampler(train_pool, mp.ways, mp.shots, mp.queries, tasks, seed=seed)
    optimizer, scheduler = build_meta_optimizer(method, **mp.meta_optimizer.model_dump(exclude={"grad_clip"}), total_steps=budget.episodes)
    trainer = MetaTrainer(
        method, sampler, optimizer, scheduler, max_episodes=budget.episodes, max_seconds=budget.seconds, precision=dtype,
        validate=validation_accuracy(val_pool, ways=v.ways, shots=v.shots, queries=v.queries, tasks=v.tasks, seed=p.seed + 1,
                                     batch_tasks=p.evaluate.batch_tasks, dtype=dtype),
        val_every=mp.val_every or p.train.val_every, diagnose=diagnostics_on(val_pool, mp.ways, mp.shots, mp.queries, p.seed + 2),
        checkpoint_dir=checkpoints.state, checkpoint_every=p.train.checkpoint_every, grad_clip=mp.meta_optimizer.grad_clip,
        distributed=group, progress=p.train.progress if p.train.progress != "auto" else ("bar" if sys.stderr.isatty() else "log"))
    if group is not None and not group.is_main:  # a worker rank: its share of every step, no tracking, no files
        trainer.run()
        return

    run_id = checkpoints.resume_run_id()
    tags = {"method": mp.kind, "method_key": key, "profile": p.profile, "dataset": p.data.name, "data_digest": info_digest(PREPARED),
            **({"processes": str(group.world_size)} if group else {})}
    logged = {"method": mp.flat(), "data": p.data.model_dump(mode="json"), "train": p.train.model_dump(mode="json"),
              "seed": p.seed, "profile": p.profile, "budget": budget.model_dump(mode="json")}
    with tracking.stage_run(p, f"train@{key}", key, tags=tags, params=logged, device=device, run_id=run_id) as run:
        tracking.log_splits(PREPARED, {"train": "training", "val": "validation"})
        checkpoints.started(run.info.run_id, precision=choice.to_json())
        mlflow.set_tags(choice.tags())
        result = trainer.run(log=tracking.MetricLogger(run.info.run_id))
        costs = {"meta_train_seconds": result.seconds, "meta_train_episodes": result.episodes, "episodes_per_second": result.episodes_per_second,
                 "peak_memory_mb": result.peak_memory_mb, "best_val_accuracy": result.best_val_accuracy, "best_episode": result.best_episode,
                 "meta_parameters": sum(t.numel() for t in method.parameters() if t.requires_grad)}
        if pretrained:
            costs |= {k: pretrained[k] for k in ("pretrain_seconds", "pretrain_peak_memory_mb")}
            mlflow.set_tags({"feature_map_model": pretrained["registered_name"], "feature_map_version": pretrained["registered_version"]})
        mlflow.log_metrics(costs)
        mlflow.set_tag("memory_kind", result.memory_kind)
        costs |= {"precision": choice.to_json(), "memory_kind": result.memory_kind, "budget_capped": tracking.note_capped(result.episodes, budget, f"train@{key}")}
        if pretrained:
            costs["feature_map"] = {k: pretrained[k] for k in ("registered_name", "registered_version", "run_id", "weights_sha256")}
        omega = save_meta_knowledge(method, ROOT / declared("train", "models/*", key=key),
                                    extra={"image_size": fmt.image_size, "image_format": fmt.to_dict(), "method_key": key, "dataset": p.data.name, "run_id": run.info.run_id})
        model_uri = log_pyfunc_model(omega, ways=method.fixed_ways or 2, tent=p.serving.tent_fewshot.model_dump())
        write_csv(ROOT / declared("train", "*.csv", key=key), result.history,
                  CURVE + sorted({k for row in result.history for k in row} - set(CURVE)))
        write_json(ROOT / declared("train", "runs/*/train.json", key=key), {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                                                 "model_uri": model_uri, **costs})
    checkpoints.remove()
    print(f"train@{key}: {result.episodes} episodes in {result.seconds:.0f}s ({result.episodes_per_second:.2f} ep/s), "
          f"best val {result.best_val_accuracy:.4f}; omega in {omega.relative_to(ROOT)}/, MLflow run {run.info.run_id}, "
          f"runs table {tracking.ui_link(run.info.experiment_id)}")


def choose_precision(p: Params, method, pool, checkpoints: Checkpoints, ways: int, shots: int, queries: int, tasks: int,
                     device: torch.device, group: distributed.Distributed | None) -> Choice:
    """train.precision / train.channels_last for this method: an interrupted run's choice when resuming (never a
    switch mid-run), else `metaflowlib.precision.choose` (on a CPU, `auto` times this method's step at its training
    shape, cached per machine); rank 0 decides for every rank. Prints what it chose."""
    choice = None
    if group is None or group.is_main:
        kept = checkpoints.kept("precision")
        if kept is not None:
            choice = Choice.from_json(kept, "resumed")
        else:
            probe = meta_step_probe(method, probe_episode(method, pool, ways, shots, queries, tasks, seed=p.seed))
            choice = choose(p.train.precision, p.train.channels_last, device, probe)
        print(f"train@{checkpoints.name}: precision {choice.describe()}", flush=True)
    return choice if group is None else group.broadcast_object(choice)


def load_pretrained(method, key: str) -> dict:
    """Load the `pretrain@<key>` feature map into a method that starts from one; its record (or {})."""
    if method.pretrained_module is None:
        return {}
    record = ROOT / declared("train", "runs/*/pretrain.json", key=key)
    if not record.is_file() or not read_json(record).get("pretrained"):
        raise DataError(f"{method.kind} starts from a pre-trained {method.pretrained_module}, and pretrained/{key} has none: "
                        f"run `dvc repro pretrain@{key}` (and check that methods.{key} has a pretrain block)")
    embedding, _ = load_meta_knowledge(ROOT / declared("train", "pretrained/*", key=key))
    getattr(method, method.pretrained_module).load_state_dict(embedding.embedding.state_dict())
    return read_json(record)


if __name__ == "__main__":
    run_guarded(main)
