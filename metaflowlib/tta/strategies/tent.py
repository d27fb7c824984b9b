"""TENT: fully test-time adaptation by entropy minimization (Wang et al., ICLR 2021).

Follows the reference implementation (github.com/DequanWang/tent, tent.py):
- `configure_model`: the model in train mode, BatchNorm running statistics
  dropped (normalize with the test batch's), every parameter frozen except the
  BatchNorm affine weight/bias (the paper's modulation Delta = scale, shift);
- `forward_and_adapt`: per step, forward, loss = mean prediction entropy,
  one optimizer step; the logits returned are those of the last forward,
  i.e. computed just before the last update;
- episodic mode restores model and optimizer state before every batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaflowlib.tta.strategies.base import GradientAdapter, OptimizerFactory, entropy, require_batch, use_batch_statistics


def tent_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam lr 1e-3, betas (0.9, 0.999), no weight decay: the reference's cfgs/tent.yaml."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)


class TentAdapter(GradientAdapter):
    """Entropy minimization over the BatchNorm affine parameters.

    Args:
        model: source classifier with BatchNorm layers (copied, never modified).
        steps: updates per test batch (default 1: the reference's, "one update
            per batch to not interrupt inference").
        episodic: reset before every batch (default False: online, the
            reference's default and the paper's main setting).
        optimizer: factory over the BN affine parameters (default `tent_optimizer`);
            e.g. `functools.partial(torch.optim.SGD, lr=0.00025, momentum=0.9)`
            (the paper's ImageNet setting).

    Raises ValueError if steps < 1 or the model has no affine BatchNorm layer.

    Example:
        >>> tent = TentAdapter(model)
        >>> logits = tent.predict(x)  # adapts on x, returns the pre-update logits
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int = 1,
        episodic: bool = False,
        optimizer: OptimizerFactory = tent_optimizer,
    ) -> None:
        super().__init__(model, steps=steps, episodic=episodic, optimizer=optimizer)

    def _configure(self) -> None:
        self.model.train()
        self.model.requires_grad_(False)
        for layer in use_batch_statistics(self.model):
            for p in (layer.weight, layer.bias):
                if p is not None:
                    p.requires_grad_(True)
                    self._params.append(p)
        if not self._params:
            raise ValueError(
                f"{type(self.model).__name__} has BatchNorm layers but none with affine weight/bias; "
                "TENT trains only those (build the layers with affine=True)"
            )

    def _adapt(self, x: Tensor) -> Tensor:
        require_batch(x, "tent")
        for _ in range(self.steps):
            logits = self.model(x)
            self._update(entropy(logits).mean())
        return logits
