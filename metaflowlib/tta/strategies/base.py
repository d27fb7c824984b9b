"""The interface every test-time adaptation strategy implements.

An adapter wraps a trained classifier (images [B, C, H, W] -> logits [B, N])
and answers one test batch at a time. It works on a deep copy, so the
caller's module (the registered weights) is never modified. `reset` returns
the copy to the source weights: episodic evaluation calls it before every
batch, online evaluation never does.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from metaflowlib.models import BatchNorm2d

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
"""Builds the test-time optimizer over the parameters an adapter trains (SGD, Adam, a learned optimizer)."""


class Adapter(ABC):
    """Base of every strategy.

    Subclasses configure the copied model in `_configure` (train/eval mode,
    which parameters require grad) and implement `predict`. The state saved
    right after `_configure` is what `reset` restores.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self._configure()
        self._source_state = copy.deepcopy(self.model.state_dict())

    def _configure(self) -> None:
        """Prepare `self.model` for test time; plain inference by default."""
        self.model.eval()
        self.model.requires_grad_(False)

    @abstractmethod
    def predict(self, x: Tensor) -> Tensor:
        """Logits [B, N] for one test batch x [B, C, H, W], adapting as the strategy says."""

    def reset(self) -> None:
        """Back to the source weights (and a fresh optimizer, for strategies that train)."""
        self.model.load_state_dict(self._source_state)


class GradientAdapter(Adapter):
    """An adapter that takes optimizer steps on an unsupervised loss of each test batch.

    Args:
        model: the source classifier (copied, never modified).
        steps: optimizer steps per test batch (>= 1).
        episodic: reset to the source weights before every batch; otherwise
            the adapted state carries over (online).
        optimizer: factory called on the trained parameters, again on every reset.
    """

    def __init__(self, model: nn.Module, *, steps: int, episodic: bool, optimizer: OptimizerFactory) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (one update per test batch at least), got {steps}")
        self.steps = steps
        self.episodic = episodic
        self._make_optimizer = optimizer
        self._params: list[nn.Parameter] = []
        super().__init__(model)
        self.optimizer = optimizer(self._params)

    def reset(self) -> None:
        super().reset()
        self.optimizer = self._make_optimizer(self._params)

    def predict(self, x: Tensor) -> Tensor:
        if self.episodic:
            self.reset()
        # the evaluation may run under no_grad or inference_mode; adaptation needs autograd either way
        with torch.inference_mode(False), torch.enable_grad():
            return self._adapt(x.clone() if x.is_inference() else x).detach()

    @abstractmethod
    def _adapt(self, x: Tensor) -> Tensor:
        """Take `self.steps` updates on x (`_update`) and return its logits."""

    def _update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def entropy(logits: Tensor) -> Tensor:
    """Per-example Shannon entropy (nats) of softmax(logits): [..., N] -> [...]."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def batchnorm_layers(model: nn.Module) -> Iterator[nn.Module]:
    """torch's BatchNorm{1,2,3}d/SyncBatchNorm and metaflowlib's own BatchNorm2d (not a torch subclass)."""
    return (m for m in model.modules() if isinstance(m, (_BatchNorm, BatchNorm2d)))


def use_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm layer normalize with the current batch's statistics, in train and eval mode.

    Drops the running statistics as the TENT reference does (`configure_model`):
    with them gone, both torch's layers and ours fall back to batch
    statistics and have nothing to update. Returns the layers; raises if
    there are none, since the strategies that call this would then do nothing.
    """
    layers = list(batchnorm_layers(model))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer (torch nn.BatchNorm*d or "
            "metaflowlib.models.BatchNorm2d); the 'bn' and 'tent' strategies adapt BatchNorm only"
        )
    for layer in layers:
        layer.track_running_stats = False
        layer.running_mean = None
        layer.running_var = None
    return layers


def require_batch(x: Tensor, strategy: str) -> None:
    """Batch statistics need at least two examples (a 1x1 feature map of one example has zero variance)."""
    if x.shape[0] < 2:
        raise ValueError(
            f"the {strategy!r} strategy normalizes with test-batch statistics and needs a batch of "
            f"at least 2 examples, got {x.shape[0]}; evaluate with a larger test batch"
        )
