"""No adaptation: the source model in eval mode, the baseline every strategy is compared with."""

from __future__ import annotations

import torch
from torch import Tensor

from metaflowlib.tta.strategies.base import Adapter


class SourceAdapter(Adapter):
    """Predicts with the source weights and BatchNorm running statistics, so each example
    independently of its batch (a model built with track_running_stats=False, MAML-style,
    normalizes with batch statistics even here).

    Example:
        >>> logits = SourceAdapter(model).predict(x)
    """

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)
