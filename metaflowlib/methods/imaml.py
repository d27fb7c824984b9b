"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019).

omega   = theta, the initialization of Conv-4 + linear head.
theta_i = phi_i* ~ argmin_phi L(phi, D_i^t) + lambda/2 ||phi - theta||^2, by a few inner steps.
Meta-gradient (implicit function theorem, Lemma 1):
    d phi*/d theta = (I + H_i/lambda)^{-1},  H_i = Hessian of L(., D_i^t) at phi_i*
    g_i = (I + H_i/lambda)^{-1} grad_phi L(phi_i*, D_i^v)
solved by conjugate gradient on Hessian-vector products (Algorithm 2), so memory
does not grow with the number of inner steps: nothing backpropagates through them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, jvp

from metaflowlib.episodes import Episode
from metaflowlib.methods.base import StepStats, accuracy
from metaflowlib.methods.inner_loop import (
    InitializationLearner,
    Params,
    Vectorize,
    map_tasks,
)


class IMAML(InitializationLearner):
    """iMAML: proximal inner loop, implicit meta-gradient written into `.grad`.

    Args (besides InitializationLearner's):
        lam: lambda, the proximal strength tying phi to theta (the paper uses 0.5-2 on
            Omniglot); larger keeps phi* closer to theta and the CG system better conditioned.
        cg_steps: conjugate-gradient iterations (5 in the paper's few-shot experiments).

    Example:
        >>> imaml = IMAML(ways=5, lam=2.0)
        >>> stats = imaml.meta_gradient(episode)  # then step any torch optimizer (lr = beta)
    """

    kind = "imaml"

    def __init__(
        self,
        ways: int = 5,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        inner_steps: int = 10,
        inner_steps_eval: int = 10,
        inner_lr: float = 0.1,
        lam: float = 2.0,
        cg_steps: int = 5,
        vectorize: Vectorize = "auto",
        chunk_size: int | None = None,
    ) -> None:
        if lam <= 0:
            raise ValueError(f"lam (iMAML's lambda) must be > 0, got {lam}")
        if cg_steps < 1:
            raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
        super().__init__(
            ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size,
            inner_steps=inner_steps, inner_steps_eval=inner_steps_eval, inner_lr=inner_lr,
            vectorize=vectorize, chunk_size=chunk_size, lam=lam, cg_steps=cg_steps,
        )
        self.lam, self.cg_steps = lam, cg_steps

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int) -> Params:
        """phi_i* [T, ...]: inner steps on the proximal objective, detached from theta."""
        self.check_ways(ways)
        return self._proximal_solve(support_x, support_y, self.adaptation_steps())

    def meta_gradient(self, episode: Episode) -> StepStats:
        """.grad += 1/T sum_i (I + H_i/lambda)^{-1} grad_phi L(phi_i*, D_i^v); stats at phi_i*."""
        self.check_ways(episode.ways)
        with torch.no_grad():
            phi = self._proximal_solve(episode.support_x, episode.support_y, self.inner_steps)

            def task(phi_i: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, Tensor, Tensor]:
                query_grad, (loss, logits) = grad(self._query_loss, has_aux=True)(phi_i, qx, qy)
                g = implicit_gradient(lambda p: self.task_loss(p, sx, sy), phi_i, query_grad, self.lam, self.cg_steps)
                return g, loss, logits

            g, loss, logits = map_tasks(
                task, phi, self._inputs(episode.support_x), episode.support_y,
                self._inputs(episode.query_x), episode.query_y,
                in_dims=(0, 0, 0, 0, 0), mode=self._mode(episode.support_x), chunk_size=self.chunk_size,
            )
            for name, p in self.theta().items():
                step = g[name].mean(0)
                p.grad = step if p.grad is None else p.grad + step
        return StepStats(loss=float(loss.mean()), accuracy=accuracy(logits, episode.query_y))

    def _proximal_solve(self, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        theta = {k: p.detach() for k, p in self.theta().items()}
        return self.fine_tune(theta, support_x, support_y, steps, first_order=True, proximal=self.lam)

    def _query_loss(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """L(phi, D^v) for one task, with (loss, logits) as aux for the step statistics."""
        logits = functional_call(self.net, params, (x,))
        loss = F.cross_entropy(logits, y)
        return loss, (loss.detach(), logits.detach())


def implicit_gradient(
    support_loss: Callable[[Params], Tensor], phi: Params, query_grad: Params, lam: float, cg_steps: int
) -> Params:
    """(I + H/lambda)^{-1} query_grad, H = Hessian of support_loss at phi (Rajeswaran et al. 2019,
    Lemma 1 and Algorithm 2).

    Hessian-vector products are forward-over-reverse (`jvp` of `grad`): one extra
    forward-mode pass per CG step, no stored graph.
    """
    support_grad = grad(support_loss)

    def matvec(v: Params) -> Params:
        hv = jvp(support_grad, (phi,), (v,))[1]
        return {k: v[k] + hv[k] / lam for k in v}

    return conjugate_gradient(matvec, query_grad, cg_steps)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """x ~ A^{-1} b for symmetric A, from x = 0, with a fixed number of steps (vmap-safe: no
    data-dependent branching; a step whose denominator is exactly 0 (already converged) is a no-op)."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        alpha = _safe_div(rs, _dot(p, ap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        p = {k: r[k] + _safe_div(rs_new, rs) * p[k] for k in p}
        rs = rs_new
    return x


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))
