"""Parity of MAML and first-order MAML against an independent peer written in higher's idiom.

    nice -n 10 python bench/maml_parity.py --out bench/results/maml_parity_cpu.json

Ours: `build_method(kind, ways=5, inner_steps=1, inner_steps_eval=1, inner_lr=0.4, vectorize="loop")`
trained as `MetaTrainer.meta_step` does (zero_grad, `meta_gradient`, Adam step). The peer: a plain
`nn.Sequential` Conv-4 (torch's own BatchNorm2d, track_running_stats=False) in ours' layout (max-pooled
or strided, read from ours' config: both have the same parameter shapes) that starts from our initial
parameters (copied by position, shapes checked, then the same logits on a probe batch required) and is
trained one task at a time with
`higher.innerloop_ctx(model, SGD(lr=0.4), copy_initial_weights=False, track_higher_grads=not first_order)`,
each task's query loss divided by the number of tasks, then Adam (lr 1e-3). Both sides draw their
episodes from their own `EpisodeSampler` with the same seed (checked equal every step) and are
validated on the same fixed tasks: one inner step at lr 0.4 on the support, query accuracy per
task, batch statistics in BatchNorm (transductive) on both sides. Each validation point reports
mean accuracy +- 95% CI (1.96 std / sqrt(n)) per side, the difference, whether the CIs overlap and
whether the 95% CI of the paired per-task difference contains 0.

First order with higher: with `track_higher_grads=False`, `diffopt.step` returns the adapted weights
*detached* (`p.detach().requires_grad_()`, higher/optim.py), so `query_loss.backward()` puts the
gradient on those new leaves and nothing on `model.parameters()`: the literal idiom leaves the
initialization's `.grad` at None and Adam would not move it (`higher_first_order_reaches_init`
checks this and the result is recorded). FOMAML's outer gradient is the query-loss gradient at the
adapted weights applied to the initialization, so the peer takes it from the fast weights,
`torch.autograd.grad(query_loss, fmodel.parameters())`, and adds it to the initialization's `.grad`.

Also recorded: the max abs difference of both sides' float64 meta-gradients on the first training
episode, the max abs parameter difference (fp32) at every validation point, seconds per meta-step
(meta-gradient + optimizer step; sampling excluded) per side, ours' effective config, the commit and a
digest of the method code that ran (it is edited concurrently), the torch version and the device.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import higher
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.episodes import Episode, EpisodeIndices, EpisodeSampler, TaskPool, fixed_episodes
from metaflowlib.evaluate import confidence_interval, task_accuracies
from metaflowlib.methods import MetaLearner, build_method
from metaflowlib.runtime import device_name

WAYS, SHOTS, QUERIES, IMAGE_SIZE = 5, 1, 15, 28
INNER_STEPS = 1  # during meta-training and at validation, on both sides
KINDS = ("maml", "fomaml")
LAYOUTS = ("maxpool", "strided")


@dataclass
class Pair:
    """Both learners of one kind, from one initialization, with their optimizers."""

    kind: str
    method: MetaLearner
    ours_optimizer: torch.optim.Optimizer
    peer: nn.Sequential
    peer_inner: torch.optim.Optimizer  # higher reads its hyperparameters; it never steps itself
    peer_optimizer: torch.optim.Optimizer
    inner_lr: float

    @property
    def first_order(self) -> bool:
        return self.kind == "fomaml"


def peer_network(layout: str = "maxpool", ways: int = WAYS, in_channels: int = 1, hidden: int = 64) -> nn.Sequential:
    """Conv-4 + linear head written from the papers' descriptions, with torch's own layers only.

    "maxpool" (Vinyals et al., Snell et al.): conv stride 1, 2x2 max-pool, flattened (1x1 on 28x28).
    "strided" (Finn et al.'s Omniglot network): conv stride 2, no pooling, features averaged over space."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, kernel_size=3, stride=1 if layout == "maxpool" else 2, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
        ]
        if layout == "maxpool":
            layers.append(nn.MaxPool2d(2))
        channels = hidden
    if layout == "strided":
        layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways))


def check_same_function(ours: nn.Sequential, peer: nn.Sequential, config: dict[str, Any]) -> None:
    """Equal parameter shapes do not make equal networks (both layouts have the same shapes), so the two
    must also give the same features (everything before the head) and logits on a probe batch: a zero
    head gives any two networks the same logits."""
    probe = torch.rand(10, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=peer[0].weight.device, dtype=peer[0].weight.dtype)
    with torch.no_grad():
        outputs = ((ours[:-1](probe), peer[:-1](probe)), (ours(probe), peer(probe)))
        difference = max(float((a - b).abs().max()) for a, b in outputs)
    if difference > 1e-4:
        raise ValueError(f"the peer network computes another function than ours (max |feature or logit diff| "
                         f"{difference:.3g}); ours' config: {config}")


def copy_parameters(source: nn.Module, target: nn.Module) -> None:
    """target's parameters := source's, matched by position; both must list the same shapes."""
    theirs, ours = list(target.parameters()), list(source.parameters())
    if [p.shape for p in theirs] != [p.shape for p in ours]:
        raise ValueError(f"peer shapes {[tuple(p.shape) for p in theirs]} differ from ours {[tuple(p.shape) for p in ours]}")
    with torch.no_grad():
        for peer, mine in zip(theirs, ours):
            peer.copy_(mine)


def peer_layout(method: MetaLearner) -> str:
    """Ours' Conv-4 layout; methods built before the option existed are "maxpool"."""
    return method.config().get("layout", "maxpool")


def build_pair(
    kind: str, *, seed: int, inner_lr: float, outer_lr: float, method_kwargs: dict[str, Any],
    dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
) -> Pair:
    """Ours built under `torch.manual_seed(seed)`; the peer too, then overwritten with ours' initialization.

    Ours' outer optimizer is what `build_meta_optimizer(method, "adam", lr, ...)` builds."""
    torch.manual_seed(seed)
    method = build_method(
        kind, ways=WAYS, inner_steps=INNER_STEPS, inner_steps_eval=INNER_STEPS, inner_lr=inner_lr,
        vectorize="loop", **method_kwargs,
    ).to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    peer = peer_network(peer_layout(method)).to(device=device, dtype=dtype)
    copy_parameters(method.net, peer)
    check_same_function(method.net, peer, method.config())
    return Pair(
        kind=kind,
        method=method,
        ours_optimizer=torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=outer_lr),
        peer=peer,
        peer_inner=torch.optim.SGD(peer.parameters(), lr=inner_lr),
        peer_optimizer=torch.optim.Adam(peer.parameters(), lr=outer_lr),
        inner_lr=inner_lr,
    )


def peer_meta_gradient(model: nn.Module, inner: torch.optim.Optimizer, episode: Episode, first_order: bool) -> None:
    """Accumulate the meta-batch's mean query-loss gradient into `model`'s .grad, one task at a time.

    Second order: the documented `loss.backward()` through the unrolled inner loop. First order: the
    gradient at the (detached) adapted weights, added to the initialization's .grad (module docstring)."""
    for i in range(episode.tasks):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False, track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(INNER_STEPS):
                diffopt.step(F.cross_entropy(fmodel(episode.support_x[i]), episode.support_y[i]))
            loss = F.cross_entropy(fmodel(episode.query_x[i]), episode.query_y[i]) / episode.tasks
            if not first_order:
                loss.backward()
                continue
            grads = torch.autograd.grad(loss, list(fmodel.parameters()))
            for p, g in zip(model.parameters(), grads):
                p.grad = g if p.grad is None else p.grad + g


def higher_first_order_reaches_init(model: nn.Module, inner_lr: float, episode: Episode) -> bool:
    """Whether higher's literal idiom with track_higher_grads=False leaves any gradient on the initialization."""
    model = copy.deepcopy(model)
    inner = torch.optim.SGD(model.parameters(), lr=inner_lr)
    with higher.innerloop_ctx(model, inner, copy_initial_weights=False, track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(episode.support_x[0]), episode.support_y[0]))
        F.cross_entropy(fmodel(episode.query_x[0]), episode.query_y[0]).backward()
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def ours_meta_step(pair: Pair, episode: Episode) -> float:
    """One outer step as `MetaTrainer.meta_step` takes it; its wall seconds."""
    start = time.perf_counter()
    pair.method.train()
    pair.ours_optimizer.zero_grad(set_to_none=True)
    pair.method.meta_gradient(episode)
    pair.ours_optimizer.step()
    return time.perf_counter() - start


def peer_meta_step(pair: Pair, episode: Episode) -> float:
    """One outer step of the peer; its wall seconds."""
    start = time.perf_counter()
    pair.peer_optimizer.zero_grad(set_to_none=True)
    peer_meta_gradient(pair.peer, pair.peer_inner, episode, pair.first_order)
    pair.peer_optimizer.step()
    return time.perf_counter() - start


def same_episode(a: Episode, b: Episode) -> bool:
    return all(torch.equal(x, y) for x, y in zip((a.support_x, a.support_y, a.query_x, a.query_y), (b.support_x, b.support_y, b.query_x, b.query_y)))


def episode_as(episode: Episode, dtype: torch.dtype) -> Episode:
    return Episode(episode.support_x.to(dtype), episode.support_y, episode.query_x.to(dtype), episode.query_y, episode.ways)


def train(pair: Pair, ours_sampler: EpisodeSampler, peer_sampler: EpisodeSampler, steps: int) -> tuple[list[float], list[float]]:
    """`steps` meta-steps on both sides, interleaved (so both see the same machine load); seconds per step of each."""
    ours_seconds, peer_seconds = [], []
    for _ in range(steps):
        ours_episode, peer_episode = next(ours_sampler), next(peer_sampler)
        if not same_episode(ours_episode, peer_episode):
            raise RuntimeError("the two samplers diverged: the sides no longer see the same tasks")
        ours_seconds.append(ours_meta_step(pair, ours_episode))
        peer_seconds.append(peer_meta_step(pair, peer_episode))
    return ours_seconds, peer_seconds


def max_parameter_difference(pair: Pair) -> float:
    with torch.no_grad():
        return max(float((a - b).abs().max()) for a, b in zip(pair.method.net.parameters(), pair.peer.parameters()))


def float64_gradient_difference(pair: Pair, episode: Episode) -> dict[str, float]:
    """Both sides' meta-gradients in float64 on one episode, from copies of their current parameters.

    `other_order_max_abs_difference` is ours against the peer run with the other order (first vs second):
    the size of a real discrepancy, so an agreement of 0 is seen to be a measurement, not a vacuous check."""
    ours = copy.deepcopy(pair.method).double()
    episode = episode_as(episode, torch.float64)
    ours.train()
    ours.zero_grad(set_to_none=True)
    ours.meta_gradient(episode)
    ours_grads = [p.grad for p in ours.net.parameters()]

    def peer_grads(first_order: bool) -> list[Tensor]:
        peer = copy.deepcopy(pair.peer).double()
        peer_meta_gradient(peer, torch.optim.SGD(peer.parameters(), lr=pair.inner_lr), episode, first_order)
        return [p.grad for p in peer.parameters()]

    def max_difference(grads: list[Tensor]) -> float:
        return max(float((a - b).abs().max()) for a, b in zip(ours_grads, grads))

    difference = max_difference(peer_grads(pair.first_order))
    scale = max(float(g.abs().max()) for g in ours_grads)
    return {
        "max_abs_difference": difference, "max_abs_gradient": scale, "relative": difference / scale,
        "other_order_max_abs_difference": max_difference(peer_grads(not pair.first_order)),
    }


def ours_task_accuracies(method: MetaLearner, pool: TaskPool, indices: EpisodeIndices, batch_tasks: int) -> Tensor:
    """The project's evaluation path (`task_accuracies` in eval mode: `inner_steps_eval` steps)."""
    method.eval()
    try:
        return task_accuracies(method, pool, indices, batch_tasks, None)
    finally:
        method.train()


def peer_task_accuracies(model: nn.Module, inner_lr: float, pool: TaskPool, indices: EpisodeIndices, batch_tasks: int) -> Tensor:
    """Query accuracy per task after INNER_STEPS of higher's SGD on the support (no second-order graph)."""
    inner = torch.optim.SGD(model.parameters(), lr=inner_lr)
    out = []
    for batch in indices.batches(batch_tasks):
        episode = pool.gather(batch)
        for i in range(episode.tasks):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False, track_higher_grads=False) as (fmodel, diffopt):
                for _ in range(INNER_STEPS):
                    diffopt.step(F.cross_entropy(fmodel(episode.support_x[i]), episode.support_y[i]))
                with torch.no_grad():
                    logits = fmodel(episode.query_x[i])
            out.append((logits.argmax(-1) == episode.query_y[i]).float().mean())
    return torch.stack(out).cpu()


def compare(ours: Tensor, peer: Tensor) -> dict[str, Any]:
    """Both sides' mean +- 95% CI, their difference, and the paired per-task difference's CI."""
    ours_mean, ours_ci = confidence_interval(ours)
    peer_mean, peer_ci = confidence_interval(peer)
    paired_mean, paired_ci = confidence_interval(ours - peer)
    return {
        "ours": {"accuracy": ours_mean, "ci95": ours_ci},
        "peer": {"accuracy": peer_mean, "ci95": peer_ci},
        "difference": ours_mean - peer_mean,
        "cis_overlap": abs(ours_mean - peer_mean) <= ours_ci + peer_ci,
        "paired_difference": {"mean": paired_mean, "ci95": paired_ci},
        "paired_ci_contains_zero": abs(paired_mean) <= paired_ci,
        "identical_task_accuracies": bool(torch.equal(ours, peer)),
    }


def run_kind(kind: str, args: argparse.Namespace, train_pool: TaskPool, val_pool: TaskPool, val_indices: EpisodeIndices, device: torch.device) -> dict[str, Any]:
    """Train both sides of one kind, validating every `val_every` steps (and at the end)."""
    pair = build_pair(kind, seed=args.seed, inner_lr=args.inner_lr, outer_lr=args.outer_lr, method_kwargs=args.method_kwargs, device=device)
    first = next(EpisodeSampler(train_pool, WAYS, SHOTS, QUERIES, tasks=args.tasks, seed=args.seed))
    result: dict[str, Any] = {
        "ours_config": pair.method.config(),
        "peer_layout": peer_layout(pair.method),
        "float64_meta_gradient_at_step_0": float64_gradient_difference(pair, first),
        "higher_literal_first_order_idiom_reaches_init": higher_first_order_reaches_init(pair.peer, args.inner_lr, first) if pair.first_order else None,
    }
    samplers = [EpisodeSampler(train_pool, WAYS, SHOTS, QUERIES, tasks=args.tasks, seed=args.seed) for _ in range(2)]
    points = sorted({*range(0, args.steps, args.val_every), args.steps})
    curve, ours_seconds, peer_seconds, done = [], [], [], 0
    for step in points:
        ours_times, peer_times = train(pair, *samplers, step - done)
        ours_seconds += ours_times
        peer_seconds += peer_times
        done = step
        ours_acc = ours_task_accuracies(pair.method, val_pool, val_indices, args.batch_tasks)
        peer_acc = peer_task_accuracies(pair.peer, args.inner_lr, val_pool, val_indices, args.batch_tasks)
        curve.append({"step": step, **compare(ours_acc, peer_acc), "max_abs_parameter_difference": max_parameter_difference(pair)})
        print(f"{kind} step {step}: ours {curve[-1]['ours']['accuracy']:.4f} peer {curve[-1]['peer']['accuracy']:.4f}", flush=True)
    return {
        **result,
        "curve": curve,
        "all_paired_cis_contain_zero": all(p["paired_ci_contains_zero"] for p in curve),
        "all_cis_overlap": all(p["cis_overlap"] for p in curve),
        "seconds_per_meta_step": {side: seconds_summary(s) for side, s in (("ours", ours_seconds), ("peer", peer_seconds))},
    }


def seconds_summary(seconds: list[float]) -> dict[str, float]:
    """Median, mean, min and max over the steps after the first (which warms up allocators and kernels)."""
    warm = seconds[1:] or seconds
    return {"median": statistics.median(warm), "mean": statistics.fmean(warm), "min": min(warm), "max": max(warm), "steps": len(warm)}


def code_state() -> dict[str, Any]:
    """The commit, whether the tree had edits, and a digest of the code ours ran (methods/, models/, optim/):
    results stay traceable when the methods are being edited while the bench runs."""
    root = Path(__file__).resolve().parent.parent
    package = root / "metaflowlib"
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("methods", "models", "optim") for p in (package / folder).glob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "--", "metaflowlib")),
            "ours_source_sha256": digest.hexdigest()}


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """A temp file in the same folder, then os.replace: readers never see a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(handle.name, path)


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'kind':7} {'step':>5} {'ours':>16} {'peer':>16} {'paired diff':>18} {'0 in CI':>8} {'max |dθ|':>9}")
    for kind, result in results["kinds"].items():
        for p in result["curve"]:
            o, q, d = p["ours"], p["peer"], p["paired_difference"]
            print(f"{kind:7} {p['step']:>5} {o['accuracy']:>9.4f}±{o['ci95']:.4f} {q['accuracy']:>9.4f}±{q['ci95']:.4f} "
                  f"{d['mean']:>+10.4f}±{d['ci95']:.4f} {str(p['paired_ci_contains_zero']):>8} {p['max_abs_parameter_difference']:>9.2e}")
        g, s = result["float64_meta_gradient_at_step_0"], result["seconds_per_meta_step"]
        print(f"{kind}: float64 meta-gradient max |diff| {g['max_abs_difference']:.2e} (relative {g['relative']:.2e}); "
              f"s/step ours {s['ours']['median']:.3f} peer {s['peer']['median']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    parser.add_argument("--data", default="data/prepared", help="prepared splits (train, val)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--tasks", type=int, default=8, help="meta-batch size")
    parser.add_argument("--steps", type=int, default=150, help="meta-steps per side")
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--val-tasks", type=int, default=300)
    parser.add_argument("--batch-tasks", type=int, default=50, help="validation tasks gathered at once")
    parser.add_argument("--seed", type=int, default=0, help="initialization and training task stream")
    parser.add_argument("--val-seed", type=int, default=1, help="the fixed validation tasks")
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument("--method-kwargs", type=json.loads, default={}, help='JSON, passed to build_method, e.g. \'{"head_init": "normal"}\'')
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (shared machines)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from metaflowlib.data.store import load_pool

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train_pool = load_pool(args.data, "train", device)
    val_pool = load_pool(args.data, "val", device)
    val_indices = fixed_episodes(val_pool, args.val_tasks, WAYS, SHOTS, QUERIES, args.val_seed)
    started = time.perf_counter()
    results = {
        "code": code_state(),
        "device": device_name(device),
        "torch": torch.__version__,
        "higher": importlib.metadata.version("higher"),
        "threads": args.threads,
        "settings": {
            "ways": WAYS, "shots": SHOTS, "queries": QUERIES, "image_size": IMAGE_SIZE, "inner_steps": INNER_STEPS,
            "inner_lr": args.inner_lr, "outer_optimizer": "adam", "outer_lr": args.outer_lr, "meta_batch": args.tasks,
            "steps": args.steps, "val_every": args.val_every, "val_tasks": args.val_tasks, "seed": args.seed,
            "val_seed": args.val_seed, "val_digest": val_indices.digest(), "method_kwargs": args.method_kwargs,
            "ours_vectorize": "loop", "data": args.data,
        },
        "kinds": {kind: run_kind(kind, args, train_pool, val_pool, val_indices, device) for kind in args.kinds},
    }
    results["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(args.out, results)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
