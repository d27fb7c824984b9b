"""The one interface every meta-learning method implements.

Vocabulary (the lecture's formalism):
- omega, the meta-knowledge: this module's parameters and buffers; it is what
  meta-training produces and what the registry stores (safetensors + JSON).
- theta_i, the task parameters: what `adapt` returns for a batch of tasks
  (prototypes, fine-tuned weights, predicted classifier weights).
- Meta-training minimizes the query loss after adaptation, summed over tasks.

A method holds its mathematics and nothing else: the training loop, the
evaluation protocol, checkpoints, tracking and the registry live elsewhere
and speak to methods only through this class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.episodes import Episode


@dataclass(frozen=True)
class StepStats:
    """What one meta-step reports to the training loop: detached 0-dim tensors on the method's device, which
    the loop reads back as floats only when it logs (a float would stall a GPU once per step)."""

    loss: Tensor | float
    accuracy: Tensor | float


class MetaLearner(nn.Module, ABC):
    """Base of every method.

    Subclasses set `kind` (the params discriminator and registry key) and
    implement `adapt` and `predict`. Per-example methods (ProtoNet, parameter
    prediction) set `per_example_features = True` and implement `features`: the
    evaluation protocol then embeds a whole split once and builds every task
    from the cached features.

    A method whose `features` come from a feature map that meta-training
    leaves fixed sets `frozen_features = True`: the training loop then embeds
    the training split once and samples episodes of features. A method that
    starts from a supervised pre-trained module names it in `pretrained_module`
    (the `pretrain@` stage trains it, `train@` loads it).
    """

    kind: ClassVar[str]
    per_example_features: ClassVar[bool] = False
    frozen_features: ClassVar[bool] = False
    pretrained_module: ClassVar[str | None] = None
    transductive: ClassVar[bool] = False  # True: predictions use statistics of the whole query batch (BatchNorm)
    autocast_safe: ClassVar[bool] = True  # False: always fp32 (e.g. second derivatives through an inner loop)
    # constructor arguments added after omegas were first saved, with the value that reproduces those omegas:
    # a saved config that lacks one is rebuilt with it (artifacts.load_meta_knowledge)
    legacy_defaults: ClassVar[dict[str, Any]] = {}
    # the params block's shared fields (ways, shots, queries, tasks_per_step, meta_optimizer, budget, pretrain) as
    # its paper trains: what a `methods:` block leaves unset (config.methods)
    block_defaults: ClassVar[dict[str, Any]] = {}
    # (name, why) when the outer update is only right with one torch optimizer
    outer_optimizer: ClassVar[tuple[str, str] | None] = None

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self._config = dict(config)

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments: `type(self)(**config)` rebuilds the architecture."""
        return dict(self._config)

    @property
    def fixed_ways(self) -> int | None:
        """N when omega has a fixed N-way head (tasks of other N are refused), else None."""
        return None

    def precision(self, requested: torch.dtype | None) -> torch.dtype | None:
        """The autocast dtype to use for this method: the requested one, or None (fp32) if unsafe."""
        return requested if self.autocast_safe else None

    def features(self, x: Tensor) -> Tensor:
        """Per-example representation fed to `adapt`/`predict`; identity unless overridden."""
        return x

    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int) -> Any:
        """theta_i for each task: support [T, N*K, ...] -> task parameters (batched over T)."""

    @abstractmethod
    def predict(self, theta: Any, query_x: Tensor) -> Tensor:
        """Query logits [T, N*Q, N] under task parameters theta."""

    def adapt_and_predict(self, episode: Episode) -> Tensor:
        """Query logits [T, N*Q, N] of a task batch from its raw inputs: adapt on D_i^t, predict D_i^v.

        Per-example methods embed support and query in one forward pass
        (unless the episode was drawn from an already embedded pool).
        """
        t, s = episode.support_x.shape[:2]
        if self.per_example_features and not episode.embedded:
            both = torch.cat([episode.support_x, episode.query_x], dim=1)
            z = self.features(both.flatten(0, 1)).unflatten(0, (t, -1))
            support_z, query_z = z[:, :s], z[:, s:]
        else:
            support_z, query_z = episode.support_x, episode.query_x
        theta = self.adapt(support_z, episode.support_y, episode.ways)
        return self.predict(theta, query_z)

    def meta_loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Mean query cross-entropy after adaptation, and the query logits."""
        logits = self.adapt_and_predict(episode)
        return query_cross_entropy(logits, episode.query_y), logits

    def diagnostics(self, episode: Episode) -> dict[str, float]:
        """Named numbers that say whether the method's assumptions hold on these tasks (logged at each
        validation); none unless a method has assumptions worth watching."""
        return {}

    def meta_gradient(self, episode: Episode) -> StepStats:
        """Accumulate d(meta-loss)/d(omega) into `.grad`; the loop applies the outer optimizer.

        Methods whose outer update is not a loss gradient (Reptile, iMAML)
        override this and write `.grad` directly.
        """
        loss, logits = self.meta_loss(episode)
        loss.backward()
        return StepStats(loss=loss.detach(), accuracy=query_accuracy(logits, episode.query_y))


def query_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over tasks and queries of -log p(y | x); half-precision logits are upcast, float64 kept."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def query_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """The share of rows whose highest logit is the label, as a 0-dim float32 tensor where the logits are."""
    return (logits.argmax(-1) == labels).float().mean().detach()


def argmax_accuracy(logits: Tensor, labels: Tensor) -> float:
    """`query_accuracy` as a float (metaflowlib.tta.classifier.accuracy scores a model on a dataset)."""
    return float(query_accuracy(logits, labels))
