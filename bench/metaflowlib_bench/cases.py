"""The benchmark cases: one function per measurement, each returning JSON-able rows.

Every case takes a plain dict (so a fresh worker process can run it from the
command line) and builds what it measures from our components: the method, the
episode sampler and meta-training's step (`MetaTrainer.meta_step`), exactly
what `dvc repro` runs. Peers get the same episodes, the same backbone and the
same initialization.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metaflowlib_bench import minimal, peers
from metaflowlib_bench.timing import rate, seconds_per_call
from metaflowlib.episodes import Episode, EpisodeSampler, TaskPool, fixed_episodes
from metaflowlib.evaluate import (
    adaptation_seconds,
    embed_pool,
    evaluate_setting,
    task_accuracies,
)
from metaflowlib.memory import PeakMemory
from metaflowlib.methods import MetaLearner, build_method
from metaflowlib.precision import Choice, choose, meta_step_probe, probe_episode
from metaflowlib.runtime import autocast, synchronize
from metaflowlib.train import MetaTrainer, build_meta_optimizer

Row = dict[str, Any]
SPLITS = ("train", "val", "test")


def episode_name(ways: int, shots: int, queries: int) -> str:
    return f"{ways}w{shots}s{queries}q"


# ---------------------------------------------------------------- data


def pools_file(data_root: str | None, image_size: int = 28) -> Path:
    """The Vinyals splits as one uint8 npz in the temp dir, built once per data root: workers load it in a second.

    Without Omniglot (`data_root` None and none found), synthetic images of the
    same shape stand in: throughput does not depend on pixel values, accuracy does,
    and the rows say which data they used.
    """
    from metaflowlib.data.omniglot import find_source, load_omniglot, vinyals_split_dir
    from metaflowlib.data.prepare import vinyals_splits

    root = find_source(data_root, Path.cwd())
    tag = "synthetic" if root is None else hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"metaflowlib-bench-vinyals{image_size}-{tag}.npz"
    if path.exists():
        return path
    if root is None:
        rng = np.random.default_rng(0)
        counts = {"train": 4112, "val": 688, "test": 1692}
        arrays = {}
        for split, classes in counts.items():
            arrays[f"{split}_images"] = rng.integers(0, 256, (classes * 20, image_size, image_size), dtype=np.uint8)
            arrays[f"{split}_labels"] = np.repeat(np.arange(classes), 20)
    else:
        sets = load_omniglot(root, Path(tempfile.gettempdir()))
        splits = vinyals_splits(sets, vinyals_split_dir(root, Path(tempfile.gettempdir())), image_size)
        arrays = {f"{s}_{part}": getattr(splits[s], part) for s in SPLITS for part in ("images", "labels")}
    write_pools(path, arrays, "synthetic" if root is None else "omniglot-vinyals")
    return path


def write_pools(path: Path, arrays: dict[str, np.ndarray], data: str) -> None:
    """`<split>_images` uint8 [M, 28, 28] (0 = ink) and `<split>_labels` [M] for train/val/test, written atomically."""
    missing = [f"{s}_{part}" for s in SPLITS for part in ("images", "labels") if f"{s}_{part}" not in arrays]
    if missing:
        raise ValueError(f"pools file needs arrays {missing}")
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, data=np.array(data), **arrays)
    tmp.replace(path)


def load_pools(path: str | Path, device: torch.device) -> tuple[dict[str, TaskPool], str]:
    from metaflowlib.data.preprocess import to_model_input

    with np.load(path) as archive:
        pools = {
            s: TaskPool(to_model_input(archive[f"{s}_images"], 28).to(device), torch.from_numpy(archive[f"{s}_labels"]), s)
            for s in SPLITS
        }
        return pools, str(archive["data"])


# ---------------------------------------------------------------- our training step


def our_trainer(method: MetaLearner, pool: TaskPool, ways: int, shots: int, queries: int, tasks: int, *,
                lr: float = 1e-3, precision: torch.dtype | None = None, seed: int = 0, **loop: Any) -> MetaTrainer:
    """The pipeline's training loop around `method` (Adam on omega); throughput cases drive its `meta_step` directly."""
    optimizer, scheduler = build_meta_optimizer(method, "adam", lr, 10**9, 1.0)
    sampler = EpisodeSampler(pool, ways, shots, queries, tasks=tasks, seed=seed)
    settings = {"validate": lambda m: 0.0, "val_every": 10**9, "max_episodes": 10**9, "max_seconds": None, "progress": "off"}
    return MetaTrainer(method, sampler, optimizer, scheduler, precision=precision, **{**settings, **loop})


def as_the_pipeline_runs(method: MetaLearner, device: torch.device, pool: TaskPool, ways: int, shots: int, queries: int,
                         tasks: int = 1, precision: str = "auto") -> tuple[MetaLearner, torch.dtype | None, Choice]:
    """`method` on `device` as train@ runs it with the default params (precision and channels_last auto): on a CPU,
    the precision and layout that timing this method's step at this training shape chose (cached per machine,
    metaflowlib.precision); on a GPU bf16 where supported and channels_last. Returns the choice too."""
    method = method.to(device)
    choice = choose(precision, "auto", device, meta_step_probe(method, probe_episode(method, pool, ways, shots, queries, tasks)))
    if choice.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method, method.precision(choice.dtype), choice


def choose_ahead(configs: list[Row], pools_path: str | Path) -> None:
    """Time and cache (metaflowlib.precision) the choice of every ours/default ProtoNet training row before the rows
    run, in this process: the row's fresh worker then reads it, and the model copies that timing makes stay out of
    the worker's peak memory."""
    wanted = [c for c in configs if c["case"] == "protonet_training" and c["library"] == "ours" and c.get("variant") == "default"]
    if wanted:
        pools, _ = load_pools(pools_path, _device(wanted[0]))
        for c in wanted:
            torch.manual_seed(0)
            as_the_pipeline_runs(build_method("protonet"), _device(c), pools["train"], c["ways"], c["shots"], c["queries"])


def precision_row(choice: Choice, precision: torch.dtype | None) -> Row:
    """What a row says about the precision it ran in, and how that was decided."""
    return {"precision": "bf16" if precision is not None else "fp32", "channels_last": choice.channels_last,
            "precision_source": choice.source, "precision_rates": choice.rates}


def _device(config: Row) -> torch.device:
    return torch.device(config["device"])


def _timing(config: Row) -> dict[str, int]:
    return {"warmup": config["warmup"], "steps": config["steps"], "repeats": config["repeats"]}


# ---------------------------------------------------------------- ProtoNet training


def protonet_training(config: Row, pools: dict[str, TaskPool]) -> Row:
    """Meta-training episodes/s and peak memory of one library on one episode shape.

    ours/fp32: our loop in fp32, NCHW. ours/default: the pipeline's defaults (precision and
    channels_last auto: on a CPU what timing this step chose, on a GPU bf16 + channels_last). easyfsl: its TaskSampler,
    DataLoader and PrototypicalNetworks on the same Conv-4, fp32, as its README trains.
    minimal/eager, minimal/compile: the minimal loop (minimal.py), fp32, NCHW; compile on CUDA only.
    """
    device, pool = _device(config), pools["train"]
    ways, shots, queries = config["ways"], config["shots"], config["queries"]
    torch.manual_seed(0)
    library, variant = config["library"], config.get("variant", "")
    row: Row = {"case": "protonet_training", "library": library, "variant": variant,
                "episode": episode_name(ways, shots, queries), "device": device.type}
    if library == "ours":
        if variant == "default":
            method, precision, choice = as_the_pipeline_runs(build_method("protonet"), device, pool, ways, shots, queries)
            row.update(precision_row(choice, precision))
        else:
            method, precision = build_method("protonet").to(device), None
            row.update(precision="fp32", channels_last=False)
        trainer = our_trainer(method, pool, ways, shots, queries, 1, precision=precision)
        step = trainer.meta_step
        sampler = trainer.sampler
        sample_seconds = seconds_per_call(lambda: next(sampler), device, warmup=2, calls=config["steps"], repeats=config["repeats"])
    elif library == "minimal":
        step, sample = minimal.protonet_step(pool, ways, shots, queries, device, compile=variant == "compile")
        row.update(precision="fp32", channels_last=False)
        sample_seconds = seconds_per_call(sample, device, warmup=2, calls=config["steps"], repeats=config["repeats"])
    else:
        model = peers.easyfsl_protonet(peers.plain_conv4()).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        workers = config.get("workers", 0)
        loader = peers.easyfsl_episodes(pool, ways, shots, queries, workers, pin_memory=device.type == "cuda")

        def step() -> None:
            support_x, support_y, query_x, query_y, _ = next(loader)
            support_x, support_y = support_x.to(device, non_blocking=True), support_y.to(device, non_blocking=True)
            query_x, query_y = query_x.to(device, non_blocking=True), query_y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            model.process_support_set(support_x, support_y)
            F.cross_entropy(model(query_x), query_y).backward()
            optimizer.step()

        row.update(precision="fp32", channels_last=False, loader_workers=workers)
        sample_seconds = seconds_per_call(lambda: next(loader), device, warmup=2, calls=config["steps"], repeats=config["repeats"])
    with PeakMemory(device, increase=True) as memory:
        row["episodes_per_second"] = rate(step, 1, device, **_timing(config))
    row["peak_bytes"], row["memory_kind"] = memory.peak_bytes(), memory.kind
    row["sampling_seconds"] = sample_seconds["median"]
    row["sampling_share_of_step"] = sample_seconds["median"] * row["episodes_per_second"]["median"]
    return row


# ---------------------------------------------------------------- MAML training


def maml_training(config: Row, pools: dict[str, TaskPool]) -> Row:
    """Second-order MAML meta-training tasks/s and peak memory: ours (vmap, chunked vmap, loop), higher, torchopt,
    and the minimal loop (vmap; eager, or compile on CUDA).

    Finn et al.'s 5-way Omniglot step: 1 inner SGD step at alpha 0.4, Adam 1e-3 on theta.
    All start from the same theta (our initialization, copied into the peers' Conv-4), but the minimal
    loop (its own He-initialized Conv-4, zero head: the speed does not depend on the values).
    """
    device, pool = _device(config), pools["train"]
    ways, shots, queries, tasks = config["ways"], config["shots"], config["queries"], config["tasks"]
    library, variant = config["library"], config.get("variant", "")
    torch.manual_seed(0)
    vectorize = variant if variant in ("vmap", "loop") else "vmap"
    chunk = config.get("chunk_size") if variant == "chunked" else None
    method = build_method("maml", ways=ways, image_size=28, inner_steps=config["inner_steps"],
                          vectorize=vectorize, chunk_size=chunk).to(device)
    trainer = our_trainer(method, pool, ways, shots, queries, tasks)
    row: Row = {"case": "maml_training", "library": library, "variant": variant, "tasks_per_step": tasks,
                "inner_steps": config["inner_steps"], "episode": episode_name(ways, shots, queries), "device": device.type}
    if library == "ours":
        step = trainer.meta_step
    elif library == "minimal":
        step, _ = minimal.maml_step(pool, ways, shots, queries, tasks, device, compile=variant == "compile")
    else:
        net = peers.load_weights_from(peers.plain_conv4(ways=ways, layout=method.net[0].layout), method.net, pool.examples[:2].cpu()).to(device)
        build = peers.higher_maml_step if library == "higher" else peers.torchopt_maml_step
        meta_gradient = build(net, 0.4, config["inner_steps"])
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        sampler = trainer.sampler

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            meta_gradient(next(sampler))
            optimizer.step()

    with PeakMemory(device, increase=True) as memory:
        row["tasks_per_second"] = rate(step, tasks, device, **_timing(config))
    row["peak_bytes"], row["memory_kind"] = memory.peak_bytes(), memory.kind
    return row


def maml_gradient_agreement(inner_steps: int = 1, tasks: int = 2, hidden: int = 64) -> Row:
    """Relative difference of the float64 meta-gradient of ours (loop, vmap), higher, torchopt and the minimal loop
    (at one inner step) on one task batch.

    The speed comparison is only meaningful if all compute the same thing: this is the check.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    ways, shots, queries = 5, 1, 3
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1)
    episode = Episode(torch.rand(tasks, ways * shots, 1, 28, 28, generator=generator, dtype=torch.float64), labels(shots),
                      torch.rand(tasks, ways * queries, 1, 28, 28, generator=generator, dtype=torch.float64), labels(queries), ways)
    method = build_method("maml", ways=ways, hidden=hidden, image_size=28, inner_steps=inner_steps, vectorize="loop").double()
    with torch.no_grad():  # a random head: the zero head would leave some gradients identically zero
        method.net[1].weight.normal_(0, 0.1)
    reference = None
    row: Row = {"case": "maml_gradient_agreement", "inner_steps": inner_steps, "tasks": tasks, "dtype": "float64"}
    for name in ("ours-loop", "ours-vmap", "higher", "torchopt", "minimal"):
        if name == "minimal":
            if inner_steps != 1:
                row[name] = "the minimal loop takes one inner step"
                continue
            names = minimal.conv4_params(torch.device("cpu"), hidden, ways)  # ours's parameters, in the same order
            params = {k: p.detach().clone().requires_grad_() for k, p in zip(names, method.parameters())}
            x = torch.cat([episode.support_x.unflatten(1, (ways, shots)), episode.query_x.unflatten(1, (ways, queries))], dim=2)
            minimal.maml_loss(params, x, shots, 0.4, minimal.labels(ways, shots, x.device), minimal.labels(ways, queries, x.device)).backward()
            grads = [p.grad for p in params.values()]
        elif name.startswith("ours"):
            method.vectorize = name.split("-")[1]
            method.zero_grad(set_to_none=True)
            method.meta_gradient(episode)
            grads = [p.grad.clone() for p in method.parameters()]
        else:
            try:
                net = peers.load_weights_from(peers.plain_conv4(hidden=hidden, ways=ways, layout=method.net[0].layout).double(), method.net,
                                              episode.support_x[0])
                build = peers.higher_maml_step if name == "higher" else peers.torchopt_maml_step
                build(net, 0.4, inner_steps)(episode)
            except peers.PeerUnavailable as error:
                row[name] = str(error)
                continue
            grads = [p.grad.clone() for p in net.parameters()]
        flat = torch.cat([g.flatten() for g in grads])
        if reference is None:
            reference = flat
        row[f"{name}_relative_difference"] = float((flat - reference).norm() / reference.norm())
    return row


# ---------------------------------------------------------------- adaptation and evaluation


def adaptation(config: Row, pools: dict[str, TaskPool]) -> Row:
    """Test-time cost, as the pipeline runs it (precision and layout auto, timed on the training step at this shape): the evaluation
    protocol's adaptation time (one task's raw support images -> theta_i), the time to adapt and label one
    task's queries, and evaluation throughput (tasks/s in batches of 50)."""
    device, pool = _device(config), pools["test"]
    ways, shots, queries = config["ways"], config["shots"], config["queries"]
    kind = config["method"]
    torch.manual_seed(0)
    method = build_method(kind, **({"ways": ways, "image_size": 28, "inner_steps_eval": 3} if kind == "maml" else {}))
    method, precision, choice = as_the_pipeline_runs(method, device, pools["train"], ways, shots, queries)  # timed at this shape
    method.eval()
    one = pool.gather(fixed_episodes(pool, 1, ways, shots, queries, seed=0))
    batch = pool.gather(fixed_episodes(pool, 50, ways, shots, queries, seed=0))

    @torch.no_grad()
    def adapt_and_predict(episode: Episode) -> torch.Tensor:
        with autocast(device, precision):
            return method.adapt_and_predict(episode).argmax(-1)

    adapt = adaptation_seconds(method, pool, ways, shots, config["steps"] * config["repeats"], 0, precision)
    latency = seconds_per_call(lambda: adapt_and_predict(one), device, warmup=3, calls=config["steps"], repeats=config["repeats"])
    throughput = rate(lambda: adapt_and_predict(batch), batch.tasks, device, warmup=1, steps=max(1, config["steps"] // 5),
                      repeats=config["repeats"])
    return {"case": "adaptation", "library": "ours", "method": kind, "episode": episode_name(ways, shots, queries),
            "device": device.type, **precision_row(choice, precision),
            "adaptation_seconds_per_task": adapt, "adapt_and_predict_seconds_per_task": latency,
            "evaluation_tasks_per_second": throughput}


# ---------------------------------------------------------------- time to accuracy


def time_to_accuracy(config: Row, pools: dict[str, TaskPool]) -> Row:
    """Meta-train for `seconds`, validating every `val_every` steps; report when validation first reached each
    target, and the test accuracy (Vinyals test split, 1000 fixed tasks, seed 2017 as the pipeline) at the end.

    The learning rate halves `halvings` times, at equal shares of the training-time budget.
    """
    device = _device(config)
    kind = config["method"]
    torch.manual_seed(config.get("seed", 0))
    train = config["train"]  # ways, shots, queries, tasks
    if kind == "protonet":
        method = build_method("protonet")
    else:
        method = build_method(kind, ways=train["ways"], image_size=28, inner_steps=config.get("inner_steps", 1),
                              inner_steps_eval=config.get("inner_steps_eval", 3), inner_lr=config.get("inner_lr", 0.4),
                              vectorize=config.get("vectorize", "auto"))
    method, precision, choice = as_the_pipeline_runs(method, device, pools["train"], train["ways"], train["shots"], train["queries"],
                                                     train["tasks"], config.get("precision", "auto"))
    val = config["validation"]
    val_indices = fixed_episodes(pools["val"], val["tasks"], val["ways"], val["shots"], val["queries"], seed=1)

    def validate(m: MetaLearner) -> float:
        m.eval()
        pool = embed_pool(m, pools["val"], precision) if m.per_example_features else pools["val"]
        accuracy = float(task_accuracies(m, pool, val_indices, 50, precision).mean())
        m.train()
        return accuracy

    curve: list[dict[str, float]] = []

    def record(metrics: dict[str, float], step: int) -> None:
        if "val_accuracy" in metrics:
            curve.append({"episode": step, "seconds": trainer.seconds, **metrics})

    budget, halvings = config["seconds"], config.get("halvings", 4)
    trainer = our_trainer(method, pools["train"], train["ways"], train["shots"], train["queries"], train["tasks"],
                          lr=config.get("lr", 1e-3), precision=precision, seed=config.get("seed", 0), validate=validate,
                          val_every=config["val_every"], max_episodes=None, max_seconds=budget, log=record)
    # step decay on the clock: the rate is unknown beforehand, the budget is not
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda _: 0.5 ** math.floor((halvings + 1) * trainer.seconds / budget))
    started = time.perf_counter()
    result = trainer.run()
    wall = time.perf_counter() - started
    method.eval()
    test = {}
    features = embed_pool(method, pools["test"], precision) if method.per_example_features else None
    for setting in config["test_settings"]:
        ways, shots = (int(v) for v in setting.rstrip("s").split("w"))
        outcome = evaluate_setting(method, pools["test"], features, ways, shots, 15, 1000, 2017, 50, precision)
        test[f"acc_{setting}"] = {"accuracy": outcome.accuracy, "ci95": outcome.ci95, "digest": outcome.digest}
    reached = {}
    for target in config.get("targets", []):
        hit = next((p for p in curve if p["val_accuracy"] >= target), None)
        reached[str(target)] = None if hit is None else hit["seconds"]
    return {
        "case": "time_to_accuracy", "library": "ours", "method": kind, "device": device.type,
        "train_episode": episode_name(train["ways"], train["shots"], train["queries"]), "tasks_per_step": train["tasks"],
        **precision_row(choice, precision), "training_seconds": result.seconds,
        "wall_seconds_with_validation": wall, "meta_steps": result.episodes, "lr_halvings": halvings, "final_lr": trainer.scheduler.get_last_lr()[0],
        "validation": val, "best_val_accuracy": result.best_val_accuracy, "best_step": result.best_episode,
        "seconds_to_val_target": reached, "curve": curve, "test": test,
        "inner_steps_eval": getattr(method, "inner_steps_eval", None),
    }


# ---------------------------------------------------------------- profiles


def profile(config: Row, pools: dict[str, TaskPool]) -> Row:
    """Where one meta-step's time goes: torch.profiler's top operators by self time (CPU and CUDA)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = _device(config)
    kind = config["method"]
    torch.manual_seed(0)
    if kind == "protonet":
        method, precision, choice = as_the_pipeline_runs(build_method("protonet"), device, pools["train"], 60, 5, 5)
        trainer = our_trainer(method, pools["train"], 60, 5, 5, 1, precision=precision)
    else:
        tasks = config.get("tasks", 32)
        method, precision, choice = as_the_pipeline_runs(build_method("maml", ways=5, image_size=28, vectorize="auto"), device,
                                                         pools["train"], 5, 1, 15, tasks)
        trainer = our_trainer(method, pools["train"], 5, 1, 15, tasks)
    for _ in range(3):
        trainer.meta_step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(config.get("steps", 5)):
            trainer.meta_step()
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=config.get("rows", 15), max_name_column_width=48)
    return {"case": "profile", "method": kind, "device": device.type, "steps": config.get("steps", 5),
            **precision_row(choice, precision), "sorted_by": sort_by, "table": table}


CASES = {f.__name__: f for f in (protonet_training, maml_training, adaptation, time_to_accuracy, profile)}


def run_case(config: Row, pools_path: str | Path) -> Row:
    """One case in this process: load the pools onto the case's device, run it, tag the row with its data."""
    pools, data = load_pools(pools_path, _device(config))
    row = CASES[config["case"]](config, pools)
    row["data"] = data
    if peers.NOTES:
        row["notes"] = list(peers.NOTES)
    return row


def ratio(numerator: dict, denominator: dict) -> float:
    """Median over median; NaN when either side is missing."""
    if not numerator or not denominator:
        return math.nan
    return numerator["median"] / denominator["median"]
