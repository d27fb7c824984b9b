"""Stage `pretrain@<method>`: supervised pre-training of the feature map a method starts from.

For a method with a `pretrain` block (parameter prediction): train its feature
map as a many-way classifier over the training classes, keep the one with the
best nearest-centroid validation accuracy, and save it as meta-knowledge of
its own: an embedding, stored as a cosine ProtoNet omega (so it is evaluated,
served and registered like any method) under `<registered name>-embedding`.
For the other methods there is nothing to do, and the stage says so.

Outputs: pretrained/<key>/ (the embedding omega, or `none.json`), runs/<key>/pretrain.json.
An interrupted run resumes from checkpoints/<key>/pretrain/ into the same MLflow run when the params match.
"""

from __future__ import annotations

import json

import torch
from _stage import PREPARED, ROOT, Checkpoints, declared, method_key, params, run_guarded

from metaflowlib import registry, tracking
from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.config.methods import method_spec
from metaflowlib.data.store import load_format, load_pool
from metaflowlib.io import WEIGHTS_FILE, atomic_path, sha256_file, write_json
from metaflowlib.methods import ProtoNet
from metaflowlib.precision import Choice, choose
from metaflowlib.pretrain import pretrain_feature_map, pretrain_probe
from metaflowlib.runtime import resolve_device, seed_everything
from metaflowlib.serving.fewshot import log_pyfunc_model
from metaflowlib.train import validation_accuracy


def main() -> None:
    import mlflow

    p, key = params(), method_key()
    mp, v = method_spec(p, key), p.train.validation
    out_dir, record = ROOT / declared("pretrain", "pretrained/*", key=key), ROOT / declared("pretrain", "runs/*", key=key)
    if mp.pretrain_in(p.profile) is None:
        with atomic_path(out_dir, is_dir=True) as tmp:
            tmp.mkdir()
            (tmp / "none.json").write_text(json.dumps({"method": key, "pretrained": False}) + "\n")
        write_json(record, {"pretrained": False})
        print(f"pretrain@{key}: {mp.kind} starts from no pre-trained module; nothing to do")
        return
    pretrain, budget = mp.pretrain_in(p.profile)
    device = resolve_device(p.device)
    seed_everything(p.seed)
    fmt = load_format(PREPARED)
    config = mp.build(fmt.image_size, fmt.channels).config()
    embedding = ProtoNet(in_channels=config["in_channels"], hidden=config["hidden"], distance="cosine", backbone=config["backbone"],
                         image_size=config["image_size"]).to(device)
    train_pool, val_pool = (load_pool(PREPARED, split, device) for split in ("train", "val"))
    checkpoints = Checkpoints.of(ROOT, f"{key}/pretrain", {
        "pretrain": pretrain.model_dump(mode="json"), "budget": budget.model_dump(mode="json"), "config": config,
        "data": p.data.model_dump(mode="json"), "seed": p.seed, "profile": p.profile, "validation": v.model_dump(mode="json"),
        "precision": p.train.precision, "channels_last": p.train.channels_last})
    kept = checkpoints.kept("precision")  # a resumed pre-training keeps the precision it started with
    choice = Choice.from_json(kept, "resumed") if kept is not None else choose(
        p.train.precision, p.train.channels_last, device,
        pretrain_probe(embedding.embedding, train_pool, dim=embedding.dim, batch_size=pretrain.batch_size, lr=pretrain.lr, scale=pretrain.scale))
    print(f"pretrain@{key}: precision {choice.describe()}", flush=True)
    dtype = choice.dtype
    if choice.channels_last:
        embedding = embedding.to(memory_format=torch.channels_last)
    nearest_centroid = validation_accuracy(val_pool, ways=v.ways, shots=v.shots, queries=v.queries, tasks=v.tasks,
                                           seed=p.seed + 1, batch_tasks=p.evaluate.batch_tasks, dtype=dtype)
    run_id = checkpoints.resume_run_id()
    name = f"{p.registered_name(key)}-embedding"
    logged = {"pretrain": pretrain.model_dump(mode="json"), "seed": p.seed, "profile": p.profile, "budget": budget.model_dump(mode="json")}
    with tracking.stage_run(p, f"pretrain@{key}", f"{key}-pretrain", tags={"method": mp.kind, "method_key": key, "profile": p.profile,
                            "dataset": p.data.name}, params=logged, device=device, run_id=run_id) as run:
        tracking.log_splits(PREPARED, {"train": "training", "val": "validation"})  # val picks the best epoch
        checkpoints.started(run.info.run_id, precision=choice.to_json())
        mlflow.set_tags(choice.tags())
        result = pretrain_feature_map(
            embedding.embedding, train_pool, dim=embedding.dim,
            batch_size=pretrain.batch_size, lr=pretrain.lr, scale=pretrain.scale, max_epochs=budget.epochs,
            max_seconds=budget.seconds, validate=lambda: nearest_centroid(embedding), seed=p.seed, precision=dtype,
            log=tracking.MetricLogger(run.info.run_id), progress=p.train.progress != "off",
            checkpoint_dir=checkpoints.state, checkpoint_every=p.train.checkpoint_every,
        )
        costs = {"pretrain_seconds": result.seconds, "pretrain_epochs": result.epochs, "pretrain_steps": result.steps,
                 "pretrain_peak_memory_mb": result.peak_memory_mb, "pretrain_best_val_accuracy": result.best_val_accuracy}
        mlflow.log_metrics(costs)
        tracking.note_capped(result.epochs, budget, f"pretrain@{key}")
        omega_dir = save_meta_knowledge(embedding, out_dir, extra={
            "image_size": fmt.image_size, "image_format": fmt.to_dict(), "method_key": key, "dataset": p.data.name, "run_id": run.info.run_id,
            "role": f"frozen feature map of {key}"})
        model_uri = log_pyfunc_model(omega_dir, tent=p.serving.tent_fewshot.model_dump())
        weights_sha256 = sha256_file(omega_dir / WEIGHTS_FILE)
        version = registry.register(
            model_uri, name,
            tags={"method": "protonet", "role": "feature_map", "feature_map_of": key, "profile": p.profile,
                  "val_accuracy_nearest_centroid": result.best_val_accuracy, "weights_sha256": weights_sha256,
                  "git_commit": tracking.git_commit()},
            description=(f"{config['backbone']['kind']} feature map pre-trained by {p.data.name} many-way classification ({result.epochs:.1f} epochs, "
                         f"{result.seconds:.0f}s); frozen inside {key}. As a cosine nearest-centroid classifier: "
                         f"val {v.ways}w{v.shots}s {100 * result.best_val_accuracy:.2f}%."),
            model_description=f"the embedding that {key} predicts classifier weights from",
        )
    write_json(record, {"pretrained": True, "run_id": run.info.run_id, "model_uri": model_uri, "registered_name": name,
                        "registered_version": version.version, "weights_sha256": weights_sha256, "precision": choice.to_json(), **costs})
    checkpoints.remove()
    print(f"pretrain@{key}: {result.epochs:.1f} epochs in {result.seconds:.0f}s, val nearest-centroid "
          f"{100 * result.best_val_accuracy:.2f}%; {out_dir.relative_to(ROOT)}/, registered {name} version {version.version}")


if __name__ == "__main__":
    run_guarded(main)
