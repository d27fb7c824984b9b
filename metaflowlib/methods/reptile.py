"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms"), batched.

The lecture's Algorithm 2 (Nichol et al., Algorithm 2):
    W_i   = SGD(L_tau_i, theta, k)                       for each sampled task tau_i
    theta <- theta + beta * 1/n sum_i (W_i - theta)
No gradient flows through the inner loop: the update direction is W_i - theta itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaflowlib.episodes import Episode
from metaflowlib.methods.base import StepStats, accuracy, query_cross_entropy
from metaflowlib.methods.inner_loop import InitializationLearner, Params, Vectorize


class Reptile(InitializationLearner):
    """Reptile over Conv-4 + linear head.

    `meta_gradient` writes .grad = -(1/n sum_i W_i - theta) (added to any existing
    .grad), so an outer `torch.optim.SGD(lr=beta)` without momentum or weight decay
    performs exactly theta <- theta + beta * mean_i (W_i - theta). Other outer
    optimizers (Adam, as in Nichol et al.'s code) treat it as a gradient.

    Args (besides InitializationLearner's):
        inner_steps: k, inner SGD steps on each training task.
        inner_steps_eval: k', SGD steps from theta on the support set in `adapt`
            (Nichol et al. evaluate with more steps than they train with).
        use_query: run the inner loop on support + query of the training task (default).
            Reptile's objective has no train/validation split: every labelled example
            of a training task is data for L_tau, and more examples make W_i less noisy;
            Nichol et al. likewise train with more shots than they test with (train_shots).
            At test time only the support set is used.

    Example:
        >>> reptile = Reptile(ways=5)
        >>> opt = torch.optim.SGD(reptile.parameters(), lr=1.0)  # lr = beta
        >>> reptile.meta_gradient(episode); opt.step(); opt.zero_grad()
    """

    kind = "reptile"

    def __init__(
        self,
        ways: int = 5,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        inner_steps: int = 5,
        inner_steps_eval: int = 10,
        inner_lr: float = 0.1,
        use_query: bool = True,
        vectorize: Vectorize = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size,
            inner_steps=inner_steps, inner_steps_eval=inner_steps_eval, inner_lr=inner_lr,
            vectorize=vectorize, chunk_size=chunk_size, use_query=use_query,
        )
        self.use_query = use_query

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int) -> Params:
        """k' SGD steps from theta on the support set (first order: nothing backpropagates through it)."""
        self.check_ways(ways)
        return self.fine_tune(self.theta(), support_x, support_y, self.adaptation_steps(), first_order=True)

    def meta_gradient(self, episode: Episode) -> StepStats:
        """.grad += -(mean_i W_i - theta); stats are W_i's loss and accuracy on the query set
        (which the inner loop has seen when use_query)."""
        self.check_ways(episode.ways)
        x, y = episode.support_x, episode.support_y
        if self.use_query:
            x, y = torch.cat([x, episode.query_x], 1), torch.cat([y, episode.query_y], 1)
        with torch.no_grad():
            theta = self.theta()
            w = self.fine_tune(theta, x, y, self.inner_steps, first_order=True)  # W_i: [T, *shape]
            for name, p in theta.items():
                direction = p - w[name].mean(0)  # -(mean_i W_i - theta)
                p.grad = direction if p.grad is None else p.grad + direction
            logits = self.predict(w, episode.query_x)
            loss = query_cross_entropy(logits, episode.query_y)
        return StepStats(loss=float(loss), accuracy=accuracy(logits, episode.query_y))
