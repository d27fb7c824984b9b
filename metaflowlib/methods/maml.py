"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), and its first-order variant.

omega   = theta, the initialization of Conv-4 + linear head.
theta_i = theta - alpha * grad L(theta, D_i^t), repeated k times (eq. 1; Algorithm 2).
Outer:    theta <- theta - beta * grad_theta sum_i L(theta_i(theta), D_i^v) (eq. 2-3); the
          gradient passes through the inner steps (Hessian-vector products), or skips them
          with first_order=True (FOMAML, sec. 5.2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metaflowlib.episodes import Episode
from metaflowlib.methods.base import StepStats, query_accuracy
from metaflowlib.models.backbones import BackboneSpec
from metaflowlib.models.conv4 import Layout
from metaflowlib.methods.inner_loop import HeadInit, InitializationLearner, Params, Vectorize


class MAML(InitializationLearner):
    """MAML: the base `meta_gradient` backpropagates the query loss through `adapt`.

    Args (besides InitializationLearner's):
        inner_steps: 1 and inner_steps_eval: 3 with inner_lr (alpha) 0.4 are the paper's
            5-way Omniglot settings (sec. 5.2).
        first_order: drop the second-order terms (FOMAML).

    Example:
        >>> maml = MAML(ways=5, inner_steps=1)
        >>> stats = maml.meta_gradient(episode)  # .grad on maml.parameters(); step any torch optimizer (lr = beta)
    """

    kind = "maml"

    def __init__(
        self,
        ways: int = 5,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        inner_steps: int = 1,
        inner_steps_eval: int = 3,
        inner_lr: float = 0.4,
        first_order: bool = False,
        head_init: HeadInit = "zeros",
        layout: Layout = "strided",
        vectorize: Vectorize = "auto",
        chunk_size: int | None = None,
        backbone: BackboneSpec = "conv4",
    ) -> None:
        super().__init__(
            ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size,
            inner_steps=inner_steps, inner_steps_eval=inner_steps_eval, inner_lr=inner_lr,
            head_init=head_init, layout=layout, vectorize=vectorize, chunk_size=chunk_size, backbone=backbone, first_order=first_order,
        )
        self.first_order = first_order

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int) -> Params:
        """theta_i [T, ...] for each task; differentiable w.r.t. theta when autograd is on."""
        self.check_ways(ways)
        return self.fine_tune(self.omega(), support_x, support_y, self.adaptation_steps(), first_order=self.first_order)

    def meta_gradient(self, episode: Episode) -> StepStats:
        """The meta-batch's gradient, accumulated chunk by chunk: each chunk's backward frees its graph, so peak
        memory follows the chunk, not the meta-batch. The per-task loop takes chunks of one task (it gains
        nothing from holding more graphs: on CPU that cut a meta-step's peak memory 11x, to higher's level);
        vmap takes `chunk_size` tasks (None: all at once, the fastest). Exact, as every task normalizes with
        its own batch statistics: the mean over tasks is the task-weighted mean of the chunks' means."""
        chunk = 1 if self._mode(episode.support_x) == "loop" else self.chunk_size
        if chunk is None or episode.tasks <= chunk:
            return super().meta_gradient(episode)
        loss_sum, correct = 0.0, 0.0
        for part in episode.split(chunk):
            loss, logits = self.meta_loss(part)
            weight = part.tasks / episode.tasks
            (loss * weight).backward()
            # on the device, in float64 as Python floats summed them: the same logged numbers, no host sync
            loss_sum = loss_sum + loss.detach().double() * weight
            correct = correct + query_accuracy(logits, part.query_y).double() * weight
        return StepStats(loss=loss_sum, accuracy=correct)


    def diagnostics(self, episode: Episode) -> dict[str, float]:
        """First-order MAML assumes d theta_i / d theta ~ I: the cosine between its meta-gradient and the
        second-order one on these tasks, over all of omega and over the head (where it failed once:
        bench/results/maml_family_diagnostics/). Second-order MAML has nothing to report."""
        if not self.first_order:
            return {}
        first, second = self._meta_grad(episode, first_order=True), self._meta_grad(episode, first_order=False)
        head = [name for name in first if name.startswith("1.")]

        def cos(names: list[str]) -> float:
            a, b = torch.cat([first[k].flatten() for k in names]), torch.cat([second[k].flatten() for k in names])
            return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

        return {"fo_so_cosine": cos(list(first)), "fo_so_cosine_head": cos(head)}

    def _meta_grad(self, episode: Episode, first_order: bool) -> dict[str, Tensor]:
        saved, self.first_order = self.first_order, first_order
        try:
            loss, _ = self.meta_loss(episode)
        finally:
            self.first_order = saved
        names, params = zip(*self.omega().items())
        return dict(zip(names, torch.autograd.grad(loss, params)))


class FOMAML(MAML):
    """First-order MAML: the same inner loop, outer gradient = sum_i grad L(theta_i, D_i^v) at theta_i."""

    kind = "fomaml"

    def __init__(self, first_order: bool = True, **config: Any) -> None:
        if not first_order:
            raise ValueError("kind 'fomaml' is first-order by definition; use kind 'maml' for second-order MAML")
        super().__init__(first_order=True, **config)
