"""Every kind of trained meta-knowledge, bitwise, on tiny budgets (issue 18).

Each case trains one omega the way its stage does (`pipelines/<stage>.py`: the same params
section, seeding, builders, sampler, validation and loop), on tiny synthetic data and an
episode / step / epoch budget (never seconds), saves it with its own saver, and compares the
SHA-256 of the weights file with tests/data/omega_digests.json:

    protonet, maml, fomaml, reptile, imaml, param_prediction   train@<key>   MetaTrainer
    pretrain@param_prediction (the feature map)                pretrain@     pretrain_feature_map
    learned_optimizer (the LSTM optimizer)                     optimizer_train  meta_train_optimizer
    tta_source, tta_ttt (the classifier and its TTT twin)      tta_source    train_classifier

param_prediction starts from the pretrain case's feature map, as train@ loads pretrain@'s: a change
there moves both digests.

The digest is SHA-256 of the `model.safetensors` bytes (`save_meta_knowledge`, `save_optimizer`,
`save_classifier`): safetensors writes a header of names, dtypes, shapes and offsets (sorted, no
metadata, no time stamp) and the raw tensor bytes, nothing else, so equal weights give equal files;
`--record` trains every case twice in one process and refuses to record a case whose two files differ.

Conditions: CPU, fp32 (precision 'fp32': no bf16 autocast, whatever the CPU supports), one intra-op
thread, channels_last true (explicit: `auto` would time the step and could pick either layout), seeds as
the stages seed them. Bitwise results
are promised only for the torch version and CPU capability (the ISA oneDNN/MKL kernels are picked
for) recorded in the JSON: elsewhere the test skips and says why.

Re-recording (`python tests/test_omega_digests.py --record`) is allowed only when an issue changes a
method's mathematics or random draws on purpose (or for a new torch version, all cases at once); the
commit names the cases whose digests changed and why. A refactor that changes a digest has changed
results: find out why instead of re-recording.
"""

from __future__ import annotations

import difflib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import class_images

from metaflowlib.artifacts import load_meta_knowledge, save_meta_knowledge
from metaflowlib.config import Params, parse_params
from metaflowlib.config.check import EXPERIMENTS
from metaflowlib.config.methods import method_spec
from metaflowlib.data.fashion_mnist import CLASSES
from metaflowlib.data.preprocess import to_model_input
from metaflowlib.episodes import EpisodeSampler, TaskPool
from metaflowlib.evaluate import embed_pool
from metaflowlib.io import WEIGHTS_FILE, sha256_file
from metaflowlib.methods import ProtoNet
from metaflowlib.learned_optimizer.learned import LSTMOptimizerNet, save_optimizer
from metaflowlib.learned_optimizer.meta_train import meta_train_optimizer
from metaflowlib.learned_optimizer.suites import build_pools, meta_training_distribution
from metaflowlib.precision import choose
from metaflowlib.pretrain import pretrain_feature_map
from metaflowlib.runtime import resolve_device, resolve_precision, seed_everything
from metaflowlib.train import MetaTrainer, build_meta_optimizer, diagnostics_on, validation_accuracy
from metaflowlib.tta.classifier import (
    build_classifier,
    save_classifier,
    train_classifier,
)

REFERENCE = Path(__file__).parent / "data" / "omega_digests.json"
THREADS = 1
TTA_IMAGE_SIZE = 28  # pipelines/tta_source.py IMAGE_SIZE

# The params of every case: each section's defaults, except budgets (episodes / meta-steps / epochs, cut to
# seconds on one thread), meta-batches, validation tasks, precision fp32 and channels_last true. Each meta-training run validates
# (and diagnoses) mid-way and at the end, and scores best at the end: the kept omega depends on every step.
TINY = {
    "device": "cpu",
    "train": {"val_every": 2, "precision": "fp32", "channels_last": True, "progress": "off", "validation": {"tasks": 4}},
    "methods": {
        "protonet": {"kind": "protonet", "ways": 20, "budget": {"default": {"episodes": 4}}},  # 60-way: 60 classes
        "maml": {"kind": "maml", "tasks_per_step": 2, "budget": {"default": {"episodes": 4}}},
        "fomaml": {"kind": "fomaml", "tasks_per_step": 2, "budget": {"default": {"episodes": 4}}},
        "reptile": {"kind": "reptile", "tasks_per_step": 2, "budget": {"default": {"episodes": 4}}},
        "imaml": {"kind": "imaml", "tasks_per_step": 2, "budget": {"default": {"episodes": 4}}},
        "param_prediction": {"kind": "param_prediction", "pretrain": {"budget": {"default": {"epochs": 2}}},
                             "val_every": 20, "budget": {"default": {"episodes": 40}}},  # its first steps lose accuracy
    },
    "tta": {"training": {"train_images": 256, "precision": "fp32"}},
    "optimizer": {"meta_train": {"budget": {"default": {"steps": 6}}}},
}
TRAIN_CLASSES, VAL_CLASSES, PER_CLASS = 24, 20, 20  # 20 drawings per class, as Omniglot; the stage's diagnoser
                                                    # draws tasks of each method's training shape from val
NOISE = 0.3  # flipped pixels on top of class_images' 5%: validation accuracy still climbs between validations


def params() -> Params:
    return parse_params(json.loads(json.dumps(TINY)), **EXPERIMENTS)


def omniglot_like(split: str) -> TaskPool:
    """A prepared split as `store.load_pool` returns it: 20 drawings per class, as Omniglot."""
    classes, seed = {"train": (TRAIN_CLASSES, 0), "val": (VAL_CLASSES, 1)}[split]
    images, labels = class_images(classes, PER_CLASS, seed=seed)
    flips = np.random.default_rng(seed).random(images.shape) < NOISE
    images[flips] = 255 - images[flips]
    return TaskPool(to_model_input(images, params().data.image_size), torch.from_numpy(labels), name=split)


# --- one helper per family: each mirrors its stage's construction, minus tracking and registry ---------------

def meta_train(key: str, out: Path) -> Path:
    """pipelines/train.py `train`: seed, build omega (loading the pretrain@ feature map), sampler, outer
    optimizer, MetaTrainer with the stage's validation and diagnostics; best omega saved."""
    p = params()
    mp, v = method_spec(p, key), p.train.validation
    budget = mp.budget_in(p.profile)
    pretrained = pretrain(key, out) if mp.pretrain_in(p.profile) else None  # the pretrain@ stage runs first
    device = resolve_device(p.device)
    choice = choose(p.train.precision, p.train.channels_last, device)  # explicit: no step to time
    dtype = choice.dtype
    seed_everything(p.seed)
    train_pool, val_pool = omniglot_like("train"), omniglot_like("val")
    method = mp.build(p.data.image_size).to(device)
    if pretrained is not None:  # train.load_pretrained
        embedding, _ = load_meta_knowledge(pretrained.parent)
        getattr(method, method.pretrained_module).load_state_dict(embedding.embedding.state_dict())
    if choice.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if method.frozen_features:
        method.eval()
        train_pool = embed_pool(method, train_pool, dtype)
    sampler = EpisodeSampler(train_pool, mp.ways, mp.shots, mp.queries, mp.tasks_per_step, seed=p.seed)
    optimizer, scheduler = build_meta_optimizer(method, **mp.meta_optimizer.model_dump(exclude={"grad_clip"}),
                                                total_steps=budget.episodes)
    MetaTrainer(
        method, sampler, optimizer, scheduler,
        validate=validation_accuracy(val_pool, ways=v.ways, shots=v.shots, queries=v.queries, tasks=v.tasks, seed=p.seed + 1,
                                     batch_tasks=p.evaluate.batch_tasks, dtype=dtype),
        val_every=mp.val_every or p.train.val_every, max_episodes=budget.episodes, max_seconds=budget.seconds,
        checkpoint_dir=out / "checkpoints" / key / "state", checkpoint_every=p.train.checkpoint_every, precision=dtype,
        grad_clip=mp.meta_optimizer.grad_clip, progress="off", diagnose=diagnostics_on(val_pool, mp.ways, mp.shots, mp.queries, p.seed + 2),
    ).run()
    return save_meta_knowledge(method, out / "models" / key) / WEIGHTS_FILE


def pretrain(key: str, out: Path) -> Path:
    """pipelines/pretrain.py: the feature map as a cosine ProtoNet, best nearest-centroid validation kept."""
    p = params()
    mp = method_spec(p, key)
    pp, budget = mp.pretrain_in(p.profile)
    device = resolve_device(p.device)
    choice = choose(p.train.precision, p.train.channels_last, device)
    dtype = choice.dtype
    seed_everything(p.seed)
    config = mp.build(p.data.image_size).config()
    embedding = ProtoNet(in_channels=config["in_channels"], hidden=config["hidden"], distance="cosine", backbone=config["backbone"],
                         image_size=config["image_size"]).to(device)
    if choice.channels_last:
        embedding = embedding.to(memory_format=torch.channels_last)
    train_pool, val_pool = omniglot_like("train"), omniglot_like("val")
    v = p.train.validation

    nearest_centroid = validation_accuracy(val_pool, ways=v.ways, shots=v.shots, queries=v.queries, tasks=v.tasks,
                                           seed=p.seed + 1, batch_tasks=p.evaluate.batch_tasks, dtype=dtype)
    pretrain_feature_map(
        embedding.embedding, train_pool, dim=embedding.dim,
        batch_size=pp.batch_size, lr=pp.lr, scale=pp.scale, max_epochs=budget.epochs, max_seconds=budget.seconds,
        validate=lambda: nearest_centroid(embedding), seed=p.seed, precision=dtype, progress=False,
    )
    return save_meta_knowledge(embedding, out / "pretrained" / key) / WEIGHTS_FILE


def learned_optimizer(out: Path) -> Path:
    """pipelines/optimizer_train.py: the LSTM optimizer by truncated BPTT over the meta-training distribution."""
    p = params()
    op, mt = p.optimizer, p.optimizer.meta_train
    device = resolve_device(p.device)
    omniglot = {split: class_images(12, PER_CLASS, seed=i) for i, split in enumerate(("train", "val", "test"))}
    fashion = {"train": class_images(len(CLASSES), 100, seed=3), "test": class_images(len(CLASSES), 100, seed=4)}
    pools = build_pools(op, omniglot, fashion)
    seed_everything(op.seed)
    net = LSTMOptimizerNet(**op.net.model_dump()).to(device)
    meta_train_optimizer(net, meta_training_distribution(op, pools, device), steps=getattr(mt.budget, p.profile).steps,
                         unroll=mt.unroll, horizon=mt.horizon, lr=mt.lr, seed=op.seed,
                         divergence_factor=mt.divergence_factor)
    return save_optimizer(net, out / "learned_optimizer") / WEIGHTS_FILE


def tta_classifier(kind: str, out: Path) -> Path:
    """pipelines/tta_source.py: the source classifier or its TTT twin on (a subset of) the training images."""
    p = params()
    t = p.tta.training
    device = resolve_device(p.device)
    dtype = resolve_precision(t.precision, device)
    images, labels = class_images(len(CLASSES), 32, size=TTA_IMAGE_SIZE, seed=5)
    if t.train_images is not None:
        keep = np.random.default_rng(p.tta.seed).permutation(len(labels))[: t.train_images]
        images, labels = images[keep], labels[keep]
    seed_everything(p.tta.seed)
    config = {"num_classes": len(CLASSES), "image_size": TTA_IMAGE_SIZE, "hidden": t.hidden,
              **({"shared_blocks": t.shared_blocks} if kind == "ttt" else {})}
    model = build_classifier(kind, **config).to(device)
    if p.tta.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_classifier(model, kind, images, labels, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=p.tta.seed,
                     device=device, dtype=dtype, channels_last=p.tta.channels_last)
    return save_classifier(model, out / "tta" / kind, kind, config, extra={}) / WEIGHTS_FILE


# --- the cases ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    description: str
    train: Callable[[Path], Path]  # output directory -> the weights file its saver wrote
    config: Callable[[Params], dict]  # the resolved params section it trains from (recorded, shown on a mismatch)


def _method(key: str, description: str) -> Case:
    return Case(description, lambda out: meta_train(key, out), lambda p: method_spec(p, key).flat())


CASES = {
    "protonet": _method("protonet", "ProtoNet (euclidean), 20w5s5q, 4 episodes, Adam 1e-3"),
    "maml": _method("maml", "second-order MAML, 5w1s15q x 2 tasks, 4 meta-steps"),
    "fomaml": _method("fomaml", "first-order MAML, 5w1s15q x 2 tasks, 4 meta-steps; fo/so diagnostics mid-way"),
    "reptile": _method("reptile", "Reptile (inner Adam on batches of 10), 5w5s5q x 2 tasks, 4 meta-steps, outer SGD 1 -> 0"),
    "imaml": _method("imaml", "iMAML (10 proximal steps, CG 5), 5w1s15q x 2 tasks, 4 meta-steps; CG diagnostics mid-way"),
    "param_prediction": _method("param_prediction", "parameter predictor on the pretrain case's feature map, 20w5s15q x 4 tasks, "
                                                    "40 episodes on features embedded once"),
    "pretrain": Case("pretrain@param_prediction: 24-way cosine classification, 2 epochs of batches of 256",
                     lambda out: pretrain("param_prediction", out),
                     lambda p: method_spec(p, "param_prediction").pretrain.model_dump(mode="json")),
    "learned_optimizer": Case("LSTM optimizer, 6 meta-steps (unroll 20, horizon 100: two tasks) on mlp and conv optimizees",
                              learned_optimizer, lambda p: p.optimizer.model_dump(mode="json")),
    "tta_source": Case("TTA source classifier (Conv-4 + BN), 2 epochs on 256 images, batches of 128",
                       lambda out: tta_classifier("source", out), lambda p: p.tta.training.model_dump(mode="json")),
    "tta_ttt": Case("its TTT twin (main + rotation loss), 2 epochs on 256 images, batches of 128",
                    lambda out: tta_classifier("ttt", out), lambda p: p.tta.training.model_dump(mode="json")),
}


def digest(case: Case) -> str:
    with tempfile.TemporaryDirectory() as out:
        return sha256_file(case.train(Path(out)))


def environment() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": THREADS}


@pytest.fixture(scope="module")
def reference() -> Iterator[dict]:
    recorded = json.loads(REFERENCE.read_text())
    here = environment()
    for key in ("torch", "cpu_capability"):
        if recorded[key] != here[key]:
            pytest.skip(f"omega digests were recorded with {key} {recorded[key]}, this is {here[key]}: bitwise results "
                        f"are only promised for the recorded torch version and CPU (tests/test_omega_digests.py)")
    threads = torch.get_num_threads()
    torch.set_num_threads(recorded["threads"])
    yield recorded
    torch.set_num_threads(threads)


def test_every_case_is_recorded(reference):
    assert set(reference["cases"]) == set(CASES), "tests/data/omega_digests.json and CASES list different cases"


@pytest.mark.parametrize("name", CASES)
def test_omega_is_bitwise_unchanged(name, reference):
    case, recorded = CASES[name], reference["cases"][name]
    actual = digest(case)
    if actual != recorded["sha256"]:
        config = json.dumps(case.config(params()), indent=1, sort_keys=True).splitlines()
        was = json.dumps(recorded["config"], indent=1, sort_keys=True).splitlines()
        changed = "\n".join(difflib.unified_diff(was, config, "recorded params", "params now", lineterm="", n=0))
        pytest.fail(f"{name} ({case.description}): omega's SHA-256 is {actual}, recorded {recorded['sha256']}. Training "
                    f"gives other weights than before; re-record only if an issue changes this method's mathematics or "
                    f"random draws on purpose (module docstring)." + (f"\nIts params changed:\n{changed}" if changed else ""))


def record(names: list[str]) -> None:
    """Train each case twice; write the digests only if every case gave the same file both times."""
    torch.set_num_threads(THREADS)
    p = params()
    previous = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    if set(names) != set(CASES) and {k: previous.get(k) for k in environment()} != environment():
        raise SystemExit(f"{REFERENCE} was recorded under other conditions than {environment()}: re-record every case")
    recorded = previous.get("cases", {})
    for name in names:
        case, start = CASES[name], time.perf_counter()
        first, second = digest(case), digest(case)
        seconds = (time.perf_counter() - start) / 2
        if first != second:
            raise SystemExit(f"{name}: two runs in one process gave different omegas ({first} vs {second}); not recorded")
        print(f"{name}: {first}  ({seconds:.1f}s a run)", flush=True)
        recorded[name] = {"description": case.description, "sha256": first, "config": case.config(p)}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    out = {**environment(), "digest": "SHA-256 of the model.safetensors its saver writes",
           "cases": {name: recorded[name] for name in CASES if name in recorded}}
    REFERENCE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "--record" or set(sys.argv[2:]) - set(CASES):
        raise SystemExit(f"usage: python {sys.argv[0]} --record [case ...]   (cases: {', '.join(CASES)}; default all)")
    record(sys.argv[2:] or list(CASES))
