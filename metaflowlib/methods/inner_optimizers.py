"""The inner-loop optimizer protocol and the hand-designed baselines that speak it.

An inner-loop optimizer is a pair of pure functions over parameter dicts:

    state = opt.init(params)
    params, state = opt.step(params, grads, state)

MAML-style inner loops, test-time adaptation and `run_optimizee` drive any
object of this shape: the learned `LSTMOptimizerNet`, or `Adam` / `SGD` below
(the baselines the learned optimizer is compared with, Andrychowicz et al.
2016, Sec. 3). Steps return new tensors and never write in place, so they stay
differentiable when the caller wants them to be.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import Tensor

Params = Mapping[str, Tensor]


class InnerOptimizer(Protocol):
    def init(self, params: Params) -> Any: ...

    def step(self, params: Params, grads: Params, state: Any) -> tuple[dict[str, Tensor], Any]: ...


class SGD:
    """theta <- theta - lr * v,  v <- momentum * v + grad (torch.optim.SGD's convention).

    Args:
        lr: step size.
        momentum: 0 gives plain gradient descent (MAML's inner loop).
    """

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        self.lr, self.momentum = lr, momentum

    def init(self, params: Params) -> dict[str, Tensor]:
        return {name: p.detach().new_zeros(p.shape) for name, p in params.items()}

    def step(
        self, params: Params, grads: Params, state: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        velocity = {name: self.momentum * state[name] + grads[name] for name in params}
        return {name: p - self.lr * velocity[name] for name, p in params.items()}, velocity


class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1), with bias-corrected moments.

    Args:
        lr: alpha (1e-3 is the paper's default).
        betas: decay rates of the first and second moment estimates.
        eps: added to sqrt(v_hat).
    """

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if lr <= 0 or not all(0 <= b < 1 for b in betas) or eps < 0:
            raise ValueError(f"need lr > 0, betas in [0, 1), eps >= 0; got lr={lr}, betas={betas}, eps={eps}")
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, params: Params) -> tuple[int, dict[str, Tensor], dict[str, Tensor]]:
        zeros = {name: p.detach().new_zeros(p.shape) for name, p in params.items()}
        return 0, zeros, dict(zeros)

    def step(
        self, params: Params, grads: Params, state: tuple[int, dict[str, Tensor], dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], tuple[int, dict[str, Tensor], dict[str, Tensor]]]:
        t, m, v = state
        t += 1
        b1, b2 = self.betas
        m = {name: b1 * m[name] + (1 - b1) * grads[name] for name in params}
        v = {name: b2 * v[name] + (1 - b2) * grads[name] * grads[name] for name in params}
        c1, c2 = 1 - b1**t, 1 - b2**t
        new = {name: p - self.lr * (m[name] / c1) / ((v[name] / c2).sqrt() + self.eps) for name, p in params.items()}
        return new, (t, m, v)
