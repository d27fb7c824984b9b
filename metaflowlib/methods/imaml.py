"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019).

omega   = theta, the initialization of Conv-4 + linear head.
theta_i = phi_i* ~ argmin_phi L(phi, D_i^t) + lambda/2 ||phi - theta||^2, by a few inner steps.
Meta-gradient (implicit function theorem, Lemma 1):
    d phi*/d theta = (I + H_i/lambda)^{-1},  H_i = Hessian of L(., D_i^t) at phi_i*
    g_i = (I + H_i/lambda)^{-1} grad_phi L(phi_i*, D_i^v)
solved by conjugate gradient on Hessian-vector products (Algorithm 2), so memory
does not grow with the number of inner steps: nothing backpropagates through them.

The system is damped as in the authors' released code (aravindr93/imaml_dev,
`learner_model.py`, `matrix_evaluator`): A v = (1 + cg_damping) v + H v / (lambda + lam_damping),
defaults 1 and 10. H of a few-shot cross-entropy is indefinite (lambda_min(H) ~ -22 to -38 on
Omniglot tasks, far below -lambda), so the undamped I + H/lambda is too, and plain CG on it returns
noise (bench/results/maml_family_diagnostics/). CG also stops, per task, at the first direction of
non-positive curvature (p'Ap <= 0, where CG's step is undefined) and reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, jvp

from metaflowlib.episodes import Episode
from metaflowlib.methods.base import StepStats, query_accuracy
from metaflowlib.models.backbones import BackboneSpec
from metaflowlib.models.conv4 import Layout
from metaflowlib.methods.inner_loop import (
    HeadInit,
    InitializationLearner,
    Params,
    Vectorize,
    map_tasks,
)


class IMAML(InitializationLearner):
    """iMAML: proximal inner loop, implicit meta-gradient written into `.grad`.

    Args (besides InitializationLearner's):
        lam: lambda, the proximal strength tying phi to theta (imaml_dev's Omniglot command: 2.0);
            larger keeps phi* closer to theta and the CG system better conditioned.
        cg_steps: conjugate-gradient iterations (5 in the paper's few-shot experiments).
        cg_damping, lam_damping: the system A = (1 + cg_damping) I + H / (lambda + lam_damping)
            of imaml_dev's `matrix_evaluator` (its defaults 1.0 and 10.0); 0 and 0 give the paper's
            undamped I + H/lambda.

    Example:
        >>> imaml = IMAML(ways=5, lam=2.0)
        >>> stats = imaml.meta_gradient(episode)  # then step any torch optimizer (lr = beta)
    """

    kind = "imaml"
    legacy_defaults = {**InitializationLearner.legacy_defaults, "cg_damping": 0.0, "lam_damping": 0.0}

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
        cg_damping: float = 1.0,
        lam_damping: float = 10.0,
        head_init: HeadInit = "zeros",
        layout: Layout = "strided",
        vectorize: Vectorize = "auto",
        chunk_size: int | None = None,
        backbone: BackboneSpec = "conv4",
    ) -> None:
        if lam <= 0:
            raise ValueError(f"lam (iMAML's lambda) must be > 0, got {lam}")
        if cg_steps < 1:
            raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
        if cg_damping < 0 or lam_damping < 0:
            raise ValueError(f"cg_damping and lam_damping must be >= 0, got {cg_damping} and {lam_damping}")
        super().__init__(
            ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size,
            inner_steps=inner_steps, inner_steps_eval=inner_steps_eval, inner_lr=inner_lr,
            head_init=head_init, layout=layout, vectorize=vectorize, chunk_size=chunk_size, backbone=backbone, lam=lam, cg_steps=cg_steps,
            cg_damping=cg_damping, lam_damping=lam_damping,
        )
        self.lam, self.cg_steps, self.cg_damping, self.lam_damping = lam, cg_steps, cg_damping, lam_damping

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int) -> Params:
        """phi_i* [T, ...]: inner steps on the proximal objective, detached from theta."""
        self.check_ways(ways)
        return self._proximal_solve(support_x, support_y, self.adaptation_steps())

    def meta_gradient(self, episode: Episode) -> StepStats:
        """.grad += 1/T sum_i A_i^{-1} grad_phi L(phi_i*, D_i^v); stats at phi_i*."""
        g, loss, logits, _, _ = self._implicit_gradients(episode)
        with torch.no_grad():
            for name, p in self.omega().items():
                step = g[name].mean(0)
                p.grad = step if p.grad is None else p.grad + step
        return StepStats(loss=loss.mean().detach(), accuracy=query_accuracy(logits, episode.query_y))

    def diagnostics(self, episode: Episode) -> dict[str, float]:
        """Is the inner problem solved, and did CG converge? Means over the episode's tasks of the
        proximal objective's gradient norm at phi_i, CG's relative residual, and the fraction of tasks
        whose CG stopped on non-positive curvature."""
        _, _, _, cg, inner_grad_norm = self._implicit_gradients(episode)
        return {"inner_grad_norm": float(inner_grad_norm.mean()), "cg_residual": float(cg.residual.mean()),
                "cg_stopped_early": float(cg.stopped.float().mean())}

    def _implicit_gradients(self, episode: Episode) -> tuple[Params, Tensor, Tensor, CGResult, Tensor]:
        """Per task: the implicit meta-gradient, query loss and logits at phi_i*, CG's report, and the
        proximal objective's gradient norm at phi_i*."""
        self.check_ways(episode.ways)
        theta = {k: p.detach() for k, p in self.omega().items()}
        with torch.no_grad():
            phi = self._proximal_solve(episode.support_x, episode.support_y, self.inner_steps)

            def task(phi_i: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
                query_grad, (loss, logits) = grad(self._query_loss, has_aux=True)(phi_i, qx, qy)
                support_grad = grad(lambda p: self.task_loss(p, sx, sy))(phi_i)
                inner_grad = {k: support_grad[k] + self.lam * (phi_i[k] - theta[k]) for k in phi_i}
                result = implicit_gradient(lambda p: self.task_loss(p, sx, sy), phi_i, query_grad, self.lam,
                                           self.cg_steps, self.cg_damping, self.lam_damping)
                return result.x, loss, logits, result.residual, result.stopped, _dot(inner_grad, inner_grad).sqrt()

            g, loss, logits, residual, stopped, inner_norm = map_tasks(
                task, phi, self._inputs(episode.support_x), episode.support_y,
                self._inputs(episode.query_x), episode.query_y,
                in_dims=(0, 0, 0, 0, 0), mode=self._mode(episode.support_x), chunk_size=self.chunk_size,
            )
        return g, loss, logits, CGResult(g, residual, stopped), inner_norm

    def _proximal_solve(self, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        theta = {k: p.detach() for k, p in self.omega().items()}
        return self.fine_tune(theta, support_x, support_y, steps, first_order=True, proximal=self.lam)

    def _query_loss(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """L(phi, D^v) for one task, with (loss, logits) as aux for the step statistics."""
        logits = functional_call(self.net, params, (x,))
        loss = F.cross_entropy(logits, y)
        return loss, (loss.detach(), logits.detach())


class CGResult(NamedTuple):
    """x ~ A^{-1} b; the relative residual ||b - A x|| / ||b|| (CG's recurrence); whether CG stopped on
    non-positive curvature."""

    x: Params
    residual: Tensor
    stopped: Tensor


def implicit_gradient(
    support_loss: Callable[[Params], Tensor], phi: Params, query_grad: Params, lam: float, cg_steps: int,
    cg_damping: float = 0.0, lam_damping: float = 0.0,
) -> CGResult:
    """A^{-1} query_grad with A = (1 + cg_damping) I + H / (lambda + lam_damping), H = Hessian of
    support_loss at phi: Rajeswaran et al. 2019, Lemma 1 and Algorithm 2 when both dampings are 0;
    imaml_dev's `matrix_evaluator` otherwise.

    Hessian-vector products are forward-over-reverse (`jvp` of `grad`): one extra
    forward-mode pass per CG step, no stored graph.
    """
    support_grad = grad(support_loss)

    def matvec(v: Params) -> Params:
        hv = jvp(support_grad, (phi,), (v,))[1]
        return {k: (1 + cg_damping) * v[k] + hv[k] / (lam + lam_damping) for k in v}

    return conjugate_gradient(matvec, query_grad, cg_steps)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> CGResult:
    """x ~ A^{-1} b for symmetric A, from x = 0, in at most `steps` iterations.

    CG assumes A positive definite; at the first direction with p'Ap <= 0 it stops and keeps the
    iterate it has (the truncated-Newton rule, Nocedal & Wright Algorithm 7.1), and says so in
    `stopped`. A converged system (r = 0) stops too. vmap-safe: stopping is a mask, not a branch.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r)
    b_norm = rs.sqrt()
    active = rs > 0
    stopped = torch.zeros_like(active)
    for _ in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        stopped = stopped | (active & (curvature <= 0))
        active = active & (curvature > 0)
        alpha = torch.where(active, rs / torch.where(active, curvature, torch.ones_like(curvature)), torch.zeros_like(rs))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        active = active & (rs_new > 0)
        beta = _safe_div(rs_new, rs)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_new
    return CGResult(x, _safe_div(rs.sqrt(), b_norm), stopped)


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))
