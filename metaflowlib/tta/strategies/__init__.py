"""Test-time adaptation strategies: name -> Adapter class. A new strategy is one file plus one entry here."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from metaflowlib.tta.strategies.base import Adapter, GradientAdapter, OptimizerFactory, entropy
from metaflowlib.tta.strategies.bn import BNAdapter
from metaflowlib.tta.strategies.source import SourceAdapter
from metaflowlib.tta.strategies.tent import TentAdapter, tent_optimizer
from metaflowlib.tta.strategies.ttt import TTTAdapter, TTTModel, joint_loss, rotate_batch, rotation_loss, ttt_optimizer

STRATEGIES: dict[str, type[Adapter]] = {
    "source": SourceAdapter,
    "bn": BNAdapter,
    "tent": TentAdapter,
    "ttt": TTTAdapter,
}


def build_adapter(name: str, model: nn.Module, **options: Any) -> Adapter:
    """Wrap `model` (copied, never modified) in the strategy `name` with its keyword options."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown adaptation strategy {name!r}; known: {sorted(STRATEGIES)}") from None
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"adaptation strategy {name!r} does not take {unknown}; it takes {accepted or 'no options'}")
    return cls(model, **options)


__all__ = [
    "STRATEGIES",
    "Adapter",
    "BNAdapter",
    "GradientAdapter",
    "OptimizerFactory",
    "SourceAdapter",
    "TTTAdapter",
    "TTTModel",
    "TentAdapter",
    "build_adapter",
    "entropy",
    "joint_loss",
    "rotate_batch",
    "rotation_loss",
    "tent_optimizer",
    "ttt_optimizer",
]
