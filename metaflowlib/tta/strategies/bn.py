"""Test-time BatchNorm statistics (Schneider et al., NeurIPS 2020, "Improving robustness
against common corruptions by covariate shift adaptation"; the "norm" baseline of TENT).

Every BatchNorm layer normalizes with the mean/variance of the test batch
instead of the source running statistics; all weights stay the source's and
nothing is trained. This is Schneider et al.'s estimator with prior strength
N = 0 (pure target statistics), as in TENT's baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaflowlib.tta.strategies.base import Adapter, require_batch, use_batch_statistics


class BNAdapter(Adapter):
    """Source weights, test-batch BatchNorm statistics; other layers (dropout...) stay in eval mode.

    Raises ValueError if the model has no BatchNorm layer.

    Example:
        >>> logits = BNAdapter(model).predict(x)  # x: a test batch of >= 2 examples
    """

    def _configure(self) -> None:
        super()._configure()
        use_batch_statistics(self.model)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        require_batch(x, "bn")
        return self.model(x)
