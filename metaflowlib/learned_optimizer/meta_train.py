"""Meta-training the LSTM optimizer over a distribution of optimizee tasks (Andrychowicz et al. 2016, Sec. 2).

An optimizee task is theta_0 (a freshly initialized small model, as a dict of
tensors) and a loss f(theta, t), where t picks the step's minibatch. The
meta-loss of phi over an unroll is the sum of the optimizee's losses along
the trajectory it produces (eq. 3 with w_t = 1):

    L(phi) = sum_{t=1..T} f(theta_t),   theta_{t+1} = theta_t + m(grad f(theta_t), h_t; phi)

Truncated BPTT: T = `unroll` steps are differentiated at a time; then Adam
updates phi, theta and h are detached, and the trajectory goes on until
`horizon` steps, when a new task is drawn. The gradients fed to the LSTM are
constants (no create_graph), which drops the optimizee's second derivatives
as the paper does.

Each unroll is one step of the training loop (`metaflowlib.loop.Loop`); the
trajectory in progress is a `Trajectory`, checkpointed with phi and Adam's
state, so a resumed run goes on bitwise where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaflowlib.errors import DataError, DivergenceError
from metaflowlib.learned_optimizer.learned import LSTMOptimizerNet, LSTMState
from metaflowlib.loop import LogFn, Loop, LoopResult
from metaflowlib.methods.inner_optimizers import InnerOptimizer


@dataclass(frozen=True)
class OptimizeeTask:
    """theta_0 and f(theta, t): the loss at step t (t selects the minibatch; full-batch tasks ignore it)."""

    params: dict[str, Tensor]
    loss: Callable[[Mapping[str, Tensor], int], Tensor]


TaskFactory = Callable[[int], OptimizeeTask]


def quadratic_task(seed: int, dim: int = 10) -> OptimizeeTask:
    """f(theta) = ||W theta - y||^2 with W, y, theta_0 i.i.d. Gaussian (the paper's Sec. 3.1)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=generator)
    y = torch.randn(dim, generator=generator)
    theta = torch.randn(dim, generator=generator)
    return OptimizeeTask(params={"theta": theta}, loss=lambda p, t: (w @ p["theta"] - y).pow(2).sum())


def synthetic_images(ways: int, per_class: int, seed: int, noise: float = 1.0) -> tuple[Tensor, Tensor]:
    """A tiny N-way image set for tests: x [N*per_class, 1, 28, 28] = class template + noise, y [N*per_class]."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randn(ways, 1, 28, 28, generator=generator)
    y = torch.arange(ways).repeat_interleave(per_class)
    x = templates[y] + noise * torch.randn(y.numel(), 1, 28, 28, generator=generator)
    return x, y


def classifier_task(
    model: str, x: Tensor, y: Tensor, *, seed: int, ways: int | None = None, batch_size: int = 128, hidden: int = 20
) -> OptimizeeTask:
    """Cross-entropy of a freshly initialized classifier on (x [B, C, H, W] float, y [B] long).

    Args:
        model: "mlp" (one sigmoid hidden layer, the paper's MNIST optimizee) or
            "conv" (two stride-2 conv layers, global pooling, linear head).
        seed: initializes the model and picks the minibatches.
        ways: number of classes (default: max label + 1).
        batch_size: examples per step, drawn with replacement (128 in the paper);
            a batch as large as the data set means full-batch training.
        hidden: hidden units of the MLP (20 in the paper), channels of the conv's last layer.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise DataError(f"x must be a float tensor [B, C, H, W], got {tuple(x.shape)} {x.dtype}")
    if y.shape != x.shape[:1] or y.dtype != torch.long:
        raise DataError(f"y must be a long tensor [{x.shape[0]}], got {tuple(y.shape)} {y.dtype}")
    ways = int(y.max()) + 1 if ways is None else ways
    if int(y.min()) < 0 or int(y.max()) >= ways:
        raise DataError(f"labels must lie in [0, {ways}), got [{int(y.min())}, {int(y.max())}]")
    channels = x.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model == "mlp":
            net = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), hidden), nn.Sigmoid(), nn.Linear(hidden, ways))
        elif model == "conv":
            net = nn.Sequential(
                nn.Conv2d(channels, hidden // 2, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(hidden // 2, hidden, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, ways),
            )
        else:
            raise ValueError(f"model must be 'mlp' or 'conv', got {model!r}")
    net = net.to(x.device)
    params = {name: p.detach() for name, p in net.named_parameters()}
    full_batch = batch_size >= x.shape[0]

    def loss(p: Mapping[str, Tensor], t: int) -> Tensor:
        if full_batch:
            xb, yb = x, y
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + t)
            idx = torch.randint(x.shape[0], (batch_size,), generator=generator).to(x.device)
            xb, yb = x[idx], y[idx]
        return F.cross_entropy(functional_call(net, dict(p), (xb,)), yb)

    return OptimizeeTask(params=params, loss=loss)


class Trajectory:
    """The optimizee trajectory truncated BPTT is on: the task (by its seed; the factory rebuilds it), theta_t,
    the LSTM memory h_t, grad f(theta_t) (what the next update reads), the position in the horizon and the
    task's initial loss; with the generator of task seeds, which draws once per horizon."""

    def __init__(self, task_factory: TaskFactory, seed: int, device: torch.device) -> None:
        self.task_factory, self.device = task_factory, device
        self.generator = torch.Generator().manual_seed(seed)
        self.index = 0  # tasks finished
        self.seed: int | None = None  # of the task in progress; None between tasks
        self.task: OptimizeeTask | None = None
        self.position, self.initial = 0, math.nan
        self.params: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.memory: LSTMState | None = None

    def begin(self, net: LSTMOptimizerNet, divergence_factor: float, step: int) -> None:
        """Draw the next task and stand at theta_0 with its gradient."""
        self.seed = int(torch.randint(2**31 - 1, (), generator=self.generator))
        self.task = self.task_factory(self.seed)
        self.params = {name: p.detach().requires_grad_() for name, p in self.task.params.items()}
        self.memory = net.init_state(self.params)
        loss = self.task.loss(self.params, 0)
        self.initial = float(loss.detach())
        _check_loss(self.initial, self.initial, divergence_factor, step, self.index, 0)
        self.grads = _grads(loss, self.params, retain_graph=False)

    def advance(self, params: dict[str, Tensor], memory: LSTMState, grads: dict[str, Tensor], steps: int,
                horizon: int) -> None:
        """Stand at theta_{t+steps}, cut from the graph; past the horizon, between tasks."""
        self.params = {name: p.detach().requires_grad_() for name, p in params.items()}
        self.memory = LSTMState(h=tuple(h.detach() for h in memory.h), c=tuple(c.detach() for c in memory.c))
        self.grads, self.position = grads, self.position + steps
        if self.position == horizon:
            self.index, self.seed, self.task, self.position = self.index + 1, None, None, 0
            self.params, self.grads, self.memory = {}, {}, None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "index": self.index, "seed": self.seed,
                "position": self.position, "initial": self.initial, "params": {k: p.detach() for k, p in self.params.items()},
                "grads": self.grads, "h": [] if self.memory is None else list(self.memory.h),
                "c": [] if self.memory is None else list(self.memory.c)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"].clone())
        self.index, self.seed, self.position, self.initial = state["index"], state["seed"], state["position"], state["initial"]
        self.task = None if self.seed is None else self.task_factory(self.seed)
        self.params = {k: p.to(self.device).requires_grad_() for k, p in state["params"].items()}
        self.grads = {k: g.to(self.device) for k, g in state["grads"].items()}
        self.memory = None if self.seed is None else LSTMState(h=tuple(h.to(self.device) for h in state["h"]),
                                                               c=tuple(c.to(self.device) for c in state["c"]))


def meta_train_optimizer(
    net: LSTMOptimizerNet,
    task_factory: TaskFactory,
    *,
    steps: int | None,
    unroll: int = 20,
    horizon: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    divergence_factor: float = 1e3,
    max_seconds: float | None = None,
    log: LogFn | None = None,
    log_every: int = 1,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 100,
    progress: bool = False,
) -> LoopResult:
    """Train phi (in place) by truncated BPTT; the result's history holds one row per meta-step.

    Args:
        net: the LSTM optimizer to train.
        task_factory: seed -> a fresh optimizee task; called once per horizon (and on resuming mid-task).
        steps / max_seconds: the budget: Adam updates of phi (each covers one unroll) and/or seconds.
        unroll: optimizee steps per truncation (20 in the paper).
        horizon: optimizee steps per task (100 in the paper); a multiple of unroll.
        lr: Adam's step size on phi.
        seed: draws the task seeds, so a seed fixes the task sequence.
        divergence_factor: an optimizee loss above this times the task's initial loss is a divergence.
        log: receives the means of meta_loss and loss over every `log_every` meta-steps, at the index
            (from 0) of the last of them.
        checkpoint_dir: resume from / save to here every `checkpoint_every` meta-steps and on SIGINT/SIGTERM.
        progress: a line every `log_every` meta-steps.

    Raises DivergenceError, before phi takes the offending update, when an
    optimizee loss is non-finite or above the divergence threshold, or the
    meta-gradient is non-finite: a diverged optimizer is never returned.
    """
    if (steps is not None and steps < 1) or unroll < 1 or horizon < unroll or horizon % unroll:
        raise ValueError(
            f"need steps >= 1 and horizon a positive multiple of unroll; got {steps=}, {unroll=}, {horizon=}"
        )
    if not (divergence_factor > 1 and 0 < lr < math.inf):
        raise ValueError(f"need divergence_factor > 1 and a finite lr > 0; got {divergence_factor=}, {lr=}")
    device = next(net.parameters()).device
    meta_opt = torch.optim.Adam(net.parameters(), lr=lr)
    trajectory = Trajectory(task_factory, seed, device)

    def truncation() -> dict[str, float]:
        step = loop.step
        if trajectory.task is None:
            trajectory.begin(net, divergence_factor, step)
        task, start, initial = trajectory.task, trajectory.position, trajectory.initial
        params, memory, grads = trajectory.params, trajectory.memory, trajectory.grads
        meta_loss = torch.zeros((), device=device)
        for t in range(start + 1, start + unroll + 1):
            params, memory = net.step(params, grads, memory)
            loss = task.loss(params, t)
            _check_loss(float(loss.detach()), initial, divergence_factor, step, trajectory.index, t)
            grads = _grads(loss, params, retain_graph=True)
            meta_loss = meta_loss + loss
        meta_opt.zero_grad(set_to_none=True)
        meta_loss.backward()
        _check_meta_gradient(net, step)
        meta_opt.step()
        metrics = {"meta_loss": float(meta_loss.detach()) / unroll, "loss": float(loss.detach()), "initial_loss": initial,
                   "task": float(trajectory.index), "optimizee_step": float(start + unroll)}
        trajectory.advance(params, memory, grads, unroll, horizon)
        return metrics

    def window_means(metrics: dict[str, float], step: int) -> None:
        if log is not None and step % log_every == 0:
            recent = loop.history[-log_every:]
            log({k: sum(row[k] for row in recent) / len(recent) for k in ("meta_loss", "loss")}, step - 1)

    loop = Loop(truncation, max_steps=steps, max_seconds=max_seconds, state={"net": net, "meta_optimizer": meta_opt,
                "trajectory": trajectory}, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                log=window_means, progress="log" if progress else "off", report_every=log_every,
                show=("meta_loss", "loss"), name="meta-training", device=device)
    return loop.run()


def run_optimizee(task: OptimizeeTask, optimizer: InnerOptimizer, steps: int) -> list[float]:
    """Losses f(theta_0), ..., f(theta_steps) of `steps` updates by any inner-loop optimizer.

    Works with the learned net, `Adam(lr)` and `SGD(lr, momentum)` alike, on
    the same minibatch sequence, so their curves compare directly. Updates run
    under no_grad; a diverging optimizer shows up as non-finite losses.
    """
    params = {name: p.detach().requires_grad_() for name, p in task.params.items()}
    state = optimizer.init(params)
    losses = []
    for t in range(steps):
        loss = task.loss(params, t)
        losses.append(float(loss.detach()))
        grads = _grads(loss, params, retain_graph=False)
        with torch.no_grad():
            params, state = optimizer.step(params, grads, state)
        params = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.no_grad():
        losses.append(float(task.loss(params, steps)))
    return losses


def _grads(loss: Tensor, params: dict[str, Tensor], *, retain_graph: bool) -> dict[str, Tensor]:
    """grad f(theta_t) as constants: no create_graph, so no second derivatives of the optimizee."""
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=retain_graph)))


def _check_loss(value: float, initial: float, factor: float, step: int, task: int, t: int) -> None:
    if math.isfinite(value) and value <= factor * abs(initial):
        return
    reason = "is not finite" if not math.isfinite(value) else f"exceeds {factor:g} x the initial loss {initial:.4g}"
    raise DivergenceError(
        f"meta-training diverged at meta-step {step} (task {task}, optimizee step {t}): optimizee loss {value:.4g} "
        f"{reason}; {_last_good(step)}"
    )


def _check_meta_gradient(net: LSTMOptimizerNet, step: int) -> None:
    if not all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None):
        raise DivergenceError(
            f"meta-training diverged at meta-step {step}: non-finite meta-gradient; {_last_good(step)}"
        )


def _last_good(step: int) -> str:
    if step == 0:
        return "the LSTM optimizer was not updated"
    return f"the LSTM optimizer holds the update of meta-step {step - 1}, the last good one"
