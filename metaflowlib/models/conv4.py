"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017).

Four blocks of conv3x3 -> BatchNorm -> ReLU, each halving the side, in one of two layouts:
- "maxpool" (Vinyals et al., Snell et al.): stride-1 conv, then 2x2 max-pool; on 28x28 inputs the
  flattened output of 64 channels is a 64-dim embedding.
- "strided" (Finn et al.'s Omniglot network, cbfinn/maml `conv_block` with `max_pool=False`, and
  `reduce_mean` over the 2x2 map in `forward_conv`): stride-2 conv, no pooling, features averaged
  over space. Its features have about 1/6 of the max-pooled ones' squared mean, which is what keeps
  MAML's alpha = 0.4 below the head's curvature limit (bench/results/maml_family_diagnostics/).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from metaflowlib.models.batchnorm import BatchNorm2d

Layout = Literal["maxpool", "strided"]
LAYOUTS = ("maxpool", "strided")


def conv4_output_dim(image_size: int, hidden: int = 64, blocks: int = 4, layout: Layout = "maxpool") -> int:
    """Feature size: max-pooling floors the side at each block (flattened); the strided layout averages space."""
    side = image_size
    for _ in range(blocks):
        side = side // 2 if layout == "maxpool" else (side + 1) // 2
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for {blocks} pooling blocks")
    return hidden * side * side if layout == "maxpool" else hidden


class Conv4(nn.Module):
    """Conv-4 feature map f_phi: [B, C_in, H, W] -> [B, D].

    Args:
        in_channels: 1 for Omniglot / Fashion-MNIST.
        hidden: channels per block (64 in every paper cited).
        composite_bn: vmap-safe BatchNorm (needed by second-order MAML).
        track_running_stats: False keeps BatchNorm transductive (MAML-style).
        layout: "maxpool" or "strided" (above).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        *,
        composite_bn: bool = False,
        track_running_stats: bool = True,
        layout: Layout = "maxpool",
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        stride = 1 if layout == "maxpool" else 2
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, hidden, kernel_size=3, stride=stride, padding=1),
                BatchNorm2d(hidden, composite=composite_bn, track_running_stats=track_running_stats),
                nn.ReLU(),
            ]
            if layout == "maxpool":
                layers.append(nn.MaxPool2d(2))
            channels = hidden
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(x)
        return h.flatten(1) if self.layout == "maxpool" else h.mean((2, 3))
