"""ResNet-12, the few-shot standard backbone (Lee et al. 2019, MetaOptNet; Tian et al. 2020, RFS).

Four residual blocks, each three conv3x3 -> BatchNorm -> LeakyReLU(0.1) with a conv1x1 + BatchNorm
shortcut, then 2x2 max-pooling: widths 64-160-320-640 in the papers, features averaged over space
(640-dim; MetaOptNet flattens instead: `pool: flatten`). Regularization as MetaOptNet's: dropout
`drop_rate` after the first two blocks, DropBlock (Ghiasi et al. 2018) of `dropblock_size` after the
last two; 0 (the default) turns both off. MetaOptNet ramps the drop rate up over training; here it is
constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.models.batchnorm import BatchNorm2d

Pool = Literal["avg", "flatten"]
WIDTHS = (64, 160, 320, 640)


class DropBlock(nn.Module):
    """Drop contiguous `size` x `size` regions of each feature map with total rate `rate` (training only)."""

    def __init__(self, rate: float, size: int) -> None:
        super().__init__()
        self.rate, self.size = rate, size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0:
            return x
        height, width = x.shape[-2:]
        size = min(self.size, height, width)
        valid = (height - size + 1) * (width - size + 1)
        gamma = self.rate / size**2 * height * width / valid  # Ghiasi et al. eq. 1: seeds so that `rate` of units drop
        seeds = torch.bernoulli(torch.full((*x.shape[:-2], height - size + 1, width - size + 1), gamma, device=x.device, dtype=x.dtype))
        dropped = F.max_pool2d(F.pad(seeds, (size - 1,) * 4), kernel_size=size, stride=1)  # each seed's size x size block
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    """Three conv3x3-BN-LeakyReLU with a conv1x1-BN shortcut, then 2x2 max-pool and dropout or DropBlock."""

    def __init__(self, in_channels: int, out_channels: int, *, drop: nn.Module, composite_bn: bool, track_running_stats: bool) -> None:
        super().__init__()

        def bn() -> BatchNorm2d:
            return BatchNorm2d(out_channels, composite=composite_bn, track_running_stats=track_running_stats)

        self.conv1, self.bn1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), bn()
        self.conv2, self.bn2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), bn()
        self.conv3, self.bn3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), bn()
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), bn())
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.1)
        h = self.bn3(self.conv3(h))
        return self.drop(F.max_pool2d(F.leaky_relu(h + self.shortcut(x), 0.1), 2))


class ResNet12(nn.Module):
    """ResNet-12 feature map: [B, C_in, H, W] -> [B, D] (D = widths[-1] with `pool: avg`).

    Args:
        in_channels: 3 for RGB, 1 for grayscale.
        widths: the four blocks' channels.
        drop_rate: dropout (blocks 1-2) and DropBlock (blocks 3-4) rate; 0 = none (MetaOptNet: 0.1).
        dropblock_size: DropBlock's region side (MetaOptNet: 5 on 84x84 images).
        pool: "avg" over space or "flatten".
        composite_bn, track_running_stats: as Conv-4's (vmap-safe BatchNorm; transductive when False).
    """

    def __init__(
        self, in_channels: int = 3, widths: Sequence[int] = WIDTHS, *, drop_rate: float = 0.0, dropblock_size: int = 5,
        pool: Pool = "avg", composite_bn: bool = False, track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive channel counts, got {list(widths)}")
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if dropblock_size < 1:
            raise ValueError(f"dropblock_size must be >= 1, got {dropblock_size}")
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        self.pool = pool
        blocks, channels = [], in_channels
        for index, width in enumerate(widths):
            drop = DropBlock(drop_rate, dropblock_size) if index >= 2 else nn.Dropout(drop_rate)
            blocks.append(ResidualBlock(channels, width, drop=drop, composite_bn=composite_bn, track_running_stats=track_running_stats))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(x)
        return h.mean((2, 3)) if self.pool == "avg" else h.flatten(1)
