"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017).

Four blocks of [conv3x3 -> BatchNorm -> ReLU -> maxpool2]; on 28x28 inputs
with 64 channels the flattened output is a 64-dim embedding.
"""

from __future__ import annotations

from torch import Tensor, nn

from metaflowlib.models.batchnorm import BatchNorm2d


def conv4_output_dim(image_size: int, hidden: int = 64, blocks: int = 4) -> int:
    """Flattened feature size: each block halves the side (floor)."""
    side = image_size
    for _ in range(blocks):
        side //= 2
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for {blocks} pooling blocks")
    return hidden * side * side


class Conv4(nn.Module):
    """Conv-4 feature map f_phi: [B, C_in, H, W] -> [B, D].

    Args:
        in_channels: 1 for Omniglot / Fashion-MNIST.
        hidden: channels per block (64 in every paper cited).
        composite_bn: vmap-safe BatchNorm (needed by second-order MAML).
        track_running_stats: False keeps BatchNorm transductive (MAML-style).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        *,
        composite_bn: bool = False,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                BatchNorm2d(hidden, composite=composite_bn, track_running_stats=track_running_stats),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = hidden
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x).flatten(1)
