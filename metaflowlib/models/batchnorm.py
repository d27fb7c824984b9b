"""BatchNorm that stays correct under `torch.func.vmap(grad(...))`.

The native batch-norm op gives a silently wrong *second-order* gradient under
vmap(grad) (float64 repro in issue #3, torch 2.11-2.13): the loop and vmap
versions of the same meta-gradient differ by orders of magnitude. Writing the
normalization from composite ops (`torch.var_mean`, mul, add) agrees with the
loop to 1e-14, so the MAML family builds its backbone with `composite=True`.
Methods that never differentiate through an inner loop keep the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchNorm2d(nn.Module):
    """BatchNorm over (N, H, W) per channel.

    Args:
        channels: number of channels C.
        composite: compute batch statistics from composite ops (vmap-safe
            second derivatives) instead of the fused kernel.
        track_running_stats: keep running mean/var for eval mode. When False
            the batch statistics are always used (transductive at test time,
            as in Finn et al. 2017).
        momentum, eps: as in `torch.nn.BatchNorm2d`.
    """

    def __init__(
        self,
        channels: int,
        *,
        composite: bool = False,
        track_running_stats: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.composite = composite
        self.track_running_stats = track_running_stats
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))
        else:
            self.running_mean = None
            self.running_var = None

    def forward(self, x: Tensor) -> Tensor:
        use_batch_stats = self.training or not self.track_running_stats
        if not self.composite:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                training=use_batch_stats, momentum=self.momentum, eps=self.eps,
            )
        if use_batch_stats:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
            if self.training and self.track_running_stats:
                self._update_running(mean, var, x.numel() // x.shape[1])
        else:
            mean = self.running_mean.view(1, -1, 1, 1)
            var = self.running_var.view(1, -1, 1, 1)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: int) -> None:
        unbiased = var.flatten() * (n / max(n - 1, 1))
        self.running_mean.lerp_(mean.flatten(), self.momentum)
        self.running_var.lerp_(unbiased, self.momentum)
