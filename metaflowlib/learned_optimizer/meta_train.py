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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaflowlib.errors import DataError, DivergenceError
from metaflowlib.methods.inner_optimizers import InnerOptimizer
from metaflowlib.learned_optimizer.learned import LSTMOptimizerNet, LSTMState


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


def meta_train_optimizer(
    net: LSTMOptimizerNet,
    task_factory: TaskFactory,
    *,
    steps: int,
    unroll: int = 20,
    horizon: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    divergence_factor: float = 1e3,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> list[dict[str, float]]:
    """Train phi (in place) by truncated BPTT; return one metrics dict per meta-step.

    Args:
        net: the LSTM optimizer to train.
        task_factory: seed -> a fresh optimizee task; called once per horizon.
        steps: Adam updates of phi (each covers one unroll).
        unroll: optimizee steps per truncation (20 in the paper).
        horizon: optimizee steps per task (100 in the paper); a multiple of unroll.
        lr: Adam's step size on phi.
        seed: draws the task seeds, so a seed fixes the task sequence.
        divergence_factor: an optimizee loss above this times the task's initial loss is a divergence.
        log: called as log(metrics, meta_step) after every meta-step.

    Raises DivergenceError, before phi takes the offending update, when an
    optimizee loss is non-finite or above the divergence threshold, or the
    meta-gradient is non-finite: a diverged optimizer is never returned.
    """
    if steps < 1 or unroll < 1 or horizon < unroll or horizon % unroll:
        raise ValueError(
            f"need steps >= 1 and horizon a positive multiple of unroll; got {steps=}, {unroll=}, {horizon=}"
        )
    if not (divergence_factor > 1 and 0 < lr < math.inf):
        raise ValueError(f"need divergence_factor > 1 and a finite lr > 0; got {divergence_factor=}, {lr=}")
    meta_opt = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    step = task_index = 0
    while step < steps:
        task = task_factory(int(torch.randint(2**31 - 1, (), generator=generator)))
        params = {name: p.detach().requires_grad_() for name, p in task.params.items()}
        state = net.init_state(params)
        loss = task.loss(params, 0)
        initial = float(loss.detach())
        _check_loss(initial, initial, divergence_factor, step, task_index, 0)
        grads = _grads(loss, params, retain_graph=False)
        for start in range(0, horizon, unroll):
            if step >= steps:
                break
            meta_loss = torch.zeros((), device=loss.device)
            for t in range(start + 1, start + unroll + 1):
                params, state = net.step(params, grads, state)
                loss = task.loss(params, t)
                _check_loss(float(loss.detach()), initial, divergence_factor, step, task_index, t)
                grads = _grads(loss, params, retain_graph=True)
                meta_loss = meta_loss + loss
            meta_opt.zero_grad(set_to_none=True)
            meta_loss.backward()
            _check_meta_gradient(net, step)
            meta_opt.step()
            params = {name: p.detach().requires_grad_() for name, p in params.items()}
            state = LSTMState(h=tuple(h.detach() for h in state.h), c=tuple(c.detach() for c in state.c))
            metrics = {
                "meta_loss": float(meta_loss.detach()) / unroll,
                "loss": float(loss.detach()),
                "initial_loss": initial,
                "task": float(task_index),
                "optimizee_step": float(start + unroll),
            }
            history.append(metrics)
            if log is not None:
                log(metrics, step)
            step += 1
        task_index += 1
    return history


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
