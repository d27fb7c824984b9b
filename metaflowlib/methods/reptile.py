"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms"), batched.

The lecture's Algorithm 2 (Nichol et al., Algorithm 2):
    W_i   = SGD(L_tau_i, theta, k)                       for each sampled task tau_i
    theta <- theta + beta * 1/n sum_i (W_i - theta)
No gradient flows through the inner loop: the update direction is W_i - theta itself.

Settings follow the authors' Omniglot commands (openai/supervised-reptile, README, "1-shot 5-way
Omniglot"): the inner "SGD" is Adam with beta1 = 0 (`run_omniglot.py` -> `tf.train.AdamOptimizer(
learning_rate, beta1=0)`), lr 1e-3, 5 steps over mini-batches of 10 of the task's 50 examples
(`--inner-batch 10 --inner-iters 5 --train-shots 10`), meta-batch 5, outer step 1 annealed linearly
to 0 (`--meta-step 1 --meta-step-final 0`), and 50 steps at test time (`--eval-iters 50`). One
difference: Adam's moments start afresh for each task (a pure function of the task), where the
reference carries them across tasks in its TensorFlow session.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from metaflowlib.episodes import Episode
from metaflowlib.methods.base import StepStats, query_accuracy, query_cross_entropy
from metaflowlib.models.backbones import BackboneSpec
from metaflowlib.models.conv4 import Layout
from metaflowlib.methods.inner_loop import HeadInit, InitializationLearner, Params, Vectorize
from metaflowlib.methods.inner_optimizers import SGD, Adam

InnerOptimizerName = Literal["sgd", "adam"]


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
        inner_optimizer: "adam" (Nichol et al.'s code: Adam, beta1 = 0, lr = inner_lr) or "sgd" (the
            paper's Algorithm 2 as written).
        inner_batch: examples per inner step during meta-training (None: all of them); at test time
            every step sees the whole support set.

    Example:
        >>> reptile = Reptile(ways=5)
        >>> opt = torch.optim.SGD(reptile.parameters(), lr=1.0)  # lr = beta
        >>> reptile.meta_gradient(episode); opt.step(); opt.zero_grad()
    """

    kind = "reptile"
    legacy_defaults = {**InitializationLearner.legacy_defaults, "inner_optimizer": "sgd", "inner_batch": None}
    # openai/supervised-reptile's 1-shot 5-way Omniglot: 10 train shots (support + query), meta-batch 5, beta 1 -> 0
    block_defaults = {**InitializationLearner.block_defaults, "shots": 5, "queries": 5, "tasks_per_step": 5,
                      "meta_optimizer": {"name": "sgd", "lr": 1.0, "schedule": "linear"}}
    outer_optimizer = ("sgd", "reptile's outer update is theta + beta * mean(W_i - theta)")

    def __init__(
        self,
        ways: int = 5,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        inner_steps: int = 5,
        inner_steps_eval: int = 50,
        inner_lr: float = 1e-3,
        use_query: bool = True,
        inner_optimizer: InnerOptimizerName = "adam",
        inner_batch: int | None = 10,
        head_init: HeadInit = "zeros",
        layout: Layout = "strided",
        vectorize: Vectorize = "auto",
        chunk_size: int | None = None,
        backbone: BackboneSpec = "conv4",
    ) -> None:
        super().__init__(
            ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size,
            inner_steps=inner_steps, inner_steps_eval=inner_steps_eval, inner_lr=inner_lr,
            head_init=head_init, layout=layout, vectorize=vectorize, chunk_size=chunk_size, backbone=backbone, use_query=use_query,
            inner_optimizer=inner_optimizer, inner_batch=inner_batch,
        )
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        if inner_batch is not None and inner_batch < 1:
            raise ValueError(f"inner_batch must be None or >= 1, got {inner_batch}")
        self.use_query, self.inner_batch = use_query, inner_batch
        self.inner_optimizer = Adam(inner_lr, betas=(0.0, 0.999)) if inner_optimizer == "adam" else SGD(inner_lr)

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int) -> Params:
        """k' SGD steps from theta on the support set (first order: nothing backpropagates through it)."""
        self.check_ways(ways)
        return self.fine_tune(self.omega(), support_x, support_y, self.adaptation_steps(), first_order=True)

    def meta_gradient(self, episode: Episode) -> StepStats:
        """.grad += -(mean_i W_i - theta); stats are W_i's loss and accuracy on the query set
        (which the inner loop has seen when use_query)."""
        self.check_ways(episode.ways)
        x, y = self._inner_data(episode)
        with torch.no_grad():
            theta = self.omega()
            w = self.fine_tune(theta, x, y, self.inner_steps, first_order=True, batch_size=self.inner_batch)  # W_i
            for name, p in theta.items():
                direction = p - w[name].mean(0)  # -(mean_i W_i - theta)
                p.grad = direction if p.grad is None else p.grad + direction
            logits = self.predict(w, episode.query_x)
            loss = query_cross_entropy(logits, episode.query_y)
        return StepStats(loss=loss, accuracy=query_accuracy(logits, episode.query_y))

    def diagnostics(self, episode: Episode) -> dict[str, float]:
        """Did the inner loop make progress on its own data? Mean over tasks of the inner loss at theta and
        at W_i, and of the gradient norm at W_i (an inner optimizer that overshoots raises the loss)."""
        x, y = self._inner_data(episode)
        theta = {k: p.detach() for k, p in self.omega().items()}
        with torch.no_grad():
            w = self.fine_tune(theta, x, y, self.inner_steps, first_order=True, batch_size=self.inner_batch)
        inputs = self._inputs(x)
        before, after, norms = [], [], []
        for i in range(episode.tasks):
            w_i = {k: v[i] for k, v in w.items()}
            loss, grads = self.task_loss(theta, inputs[i], y[i]), torch.func.grad(self.task_loss)(w_i, inputs[i], y[i])
            before.append(float(loss))
            after.append(float(self.task_loss(w_i, inputs[i], y[i])))
            norms.append(float(sum(g.pow(2).sum() for g in grads.values()).sqrt()))
        n = episode.tasks
        return {"inner_loss_before": sum(before) / n, "inner_loss_after": sum(after) / n, "inner_grad_norm": sum(norms) / n}

    def _inner_data(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """A training task's inner-loop examples, support then query when use_query, reordered so that
        consecutive mini-batches hold every class in turn (the episode lists them class by class)."""
        x, y = episode.support_x, episode.support_y
        if not self.use_query:
            return x, y
        n = episode.ways
        x = torch.cat([x.unflatten(1, (n, -1)), episode.query_x.unflatten(1, (n, -1))], 2)  # [T, N, K+Q, ...]
        y = torch.cat([y.unflatten(1, (n, -1)), episode.query_y.unflatten(1, (n, -1))], 2)
        return x.transpose(1, 2).flatten(1, 2), y.transpose(1, 2).flatten(1, 2)
