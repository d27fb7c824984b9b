"""Test-Time Training with rotation prediction (Sun et al., ICML 2020).

A Y-shaped model: a shared extractor theta_e feeding the main head theta_m
and a 4-way rotation head theta_s (Gidaris et al. 2018: 0/90/180/270 degrees).
Source training minimizes main CE + rotation CE jointly (eq. 2, `joint_loss`).
At test time, a few SGD steps on the rotation loss of the test batch update
theta_e (eq. 3; theta_s optionally), then the main head predicts.

Defaults from the paper, section 3 "Optimization details": SGD, lr 0.001 (the
last training epoch's), momentum 0 and weight decay 0; 10 steps per batch in
the standard version (reset after each prediction), 1 step in the online
version (state carries over). The paper adapts on augmented copies of a
single image; here the test batch itself, with its four rotations, is the
self-supervised batch.

Normalization: Sun et al.'s ResNet-26 uses GroupNorm, whose statistics come
from the test input itself, so their adapted extractor also normalizes with
the shifted data's statistics. With BatchNorm and a batch of distinct test
images the counterpart is the test batch's statistics (issue 6: keeping the
source running statistics left TTT at 31.7% error at Fashion-MNIST-C severity
5, behind the unadapted source's 30.8%; with batch statistics 18.4%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.tta.strategies.base import (
    GradientAdapter,
    OptimizerFactory,
    require_batch,
    use_batch_statistics,
)
from metaflowlib.models import Conv4, conv4_output_dim

ROTATIONS = 4  # 0, 90, 180, 270 degrees


class TTTModel(nn.Module):
    """Shared extractor with a main head and a rotation head: logits = head(extractor(x)).

    Args:
        extractor: theta_e, images -> features.
        head: theta_m, features -> class logits [B, N].
        rotation_head: theta_s, features -> rotation logits [B, 4].
    """

    def __init__(self, extractor: nn.Module, head: nn.Module, rotation_head: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head
        self.rotation_head = rotation_head

    @classmethod
    def conv4(
        cls, num_classes: int, image_size: int, *, in_channels: int = 1, hidden: int = 64, shared_blocks: int = 2
    ) -> TTTModel:
        """Conv-4 split after `shared_blocks` blocks; each head is the remaining blocks + a linear layer.

        The rotation branch has the main branch's architecture except for its
        4 outputs, and the default split is half-way, as Sun et al.'s ResNet-26
        split after its second of three groups.
        """
        if not 1 <= shared_blocks <= 4:
            raise ValueError(f"shared_blocks must be in 1..4 (Conv-4 has 4 blocks), got {shared_blocks}")
        split = 4 * shared_blocks  # each block is [conv, bn, relu, pool]
        main, rotation = Conv4(in_channels, hidden).blocks, Conv4(in_channels, hidden).blocks
        dim = conv4_output_dim(image_size, hidden)
        return cls(
            extractor=main[:split],
            head=nn.Sequential(main[split:], nn.Flatten(), nn.Linear(dim, num_classes)),
            rotation_head=nn.Sequential(rotation[split:], nn.Flatten(), nn.Linear(dim, ROTATIONS)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.extractor(x))

    def rotation_logits(self, x: Tensor) -> Tensor:
        """[B, 4]: which multiple of 90 degrees x was rotated by."""
        logits = self.rotation_head(self.extractor(x))
        if logits.shape[-1] != ROTATIONS:
            raise ValueError(f"rotation_head must output {ROTATIONS} logits (0/90/180/270), got {logits.shape[-1]}")
        return logits


def rotate_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """All four rotations of every image: x [B, C, H, W] -> (x_rot [4B, C, H, W], labels [4B]).

    x_rot[k * B + i] = rot90(x[i], k) over (H, W), with label k.
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images [B, C, H, W], got shape {tuple(x.shape)}")
    x_rot = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return x_rot, labels


def rotation_loss(model: TTTModel, x: Tensor) -> Tensor:
    """l_s(x): mean CE of the rotation head over the four rotations of x."""
    x_rot, labels = rotate_batch(x)
    return F.cross_entropy(model.rotation_logits(x_rot), labels)


def joint_loss(model: TTTModel, x: Tensor, y: Tensor) -> Tensor:
    """Source training objective (eq. 2): main CE on (x, y) + rotation CE on x."""
    return F.cross_entropy(model(x), y) + rotation_loss(model, x)


def ttt_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD lr 0.001, momentum 0, weight decay 0 (Sun et al., section 3)."""
    return torch.optim.SGD(params, lr=1e-3, momentum=0.0, weight_decay=0.0)


class TTTAdapter(GradientAdapter):
    """Rotation-loss steps on each test batch, then prediction with the main head.

    Dropout and the like stay in eval mode; BatchNorm normalizes every forward
    (the rotation loss's and the prediction's) with the current batch's
    statistics, the BatchNorm counterpart of Sun et al.'s GroupNorm (module
    docstring).

    Args:
        model: a `TTTModel` trained with `joint_loss` (copied, never modified).
        episodic: True (default) is the standard version, reset before every
            batch; False is TTT-Online.
        steps: SGD steps per batch; default 10 if episodic else 1, as the paper.
        update_rotation_head: also train theta_s (default False: eq. 3 updates
            theta_e only; the paper finds the difference negligible).
        optimizer: factory over the trained parameters (default `ttt_optimizer`).
        batch_statistics: normalize with the test batch (default True); False
            keeps the source running statistics, the variant that trails the
            unadapted source classifier under shift (the ablation of issue 6).

    Raises ValueError if the model is not a TTTModel or steps < 1, and, with
    batch statistics, on a test batch of fewer than 2 examples.

    Example:
        >>> model = TTTModel.conv4(num_classes=10, image_size=28)
        >>> ...  # train with joint_loss
        >>> logits = TTTAdapter(model).predict(x)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        episodic: bool = True,
        steps: int | None = None,
        update_rotation_head: bool = False,
        optimizer: OptimizerFactory = ttt_optimizer,
        batch_statistics: bool = True,
    ) -> None:
        if not isinstance(model, TTTModel):
            raise ValueError(
                f"the 'ttt' strategy needs a TTTModel (shared extractor + main head + rotation head) "
                f"trained with joint_loss, got {type(model).__name__}"
            )
        if steps is None:
            steps = 10 if episodic else 1
        self.update_rotation_head = update_rotation_head
        self.batch_statistics = batch_statistics
        super().__init__(model, steps=steps, episodic=episodic, optimizer=optimizer)

    def _configure(self) -> None:
        super()._configure()
        if self.batch_statistics:
            use_batch_statistics(self.model)
        trained = [self.model.extractor] + ([self.model.rotation_head] if self.update_rotation_head else [])
        for module in trained:
            module.requires_grad_(True)
            self._params.extend(module.parameters())

    def _adapt(self, x: Tensor) -> Tensor:
        if self.batch_statistics:
            require_batch(x, "ttt")
        for _ in range(self.steps):
            self._update(rotation_loss(self.model, x))
        with torch.no_grad():
            return self.model(x)
