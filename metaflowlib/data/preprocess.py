"""The one image preprocessing used in training, evaluation and serving.

Stored and served images are uint8 [N, H, W] with 0 = black ink and 255 =
white paper. Models see float [N, 1, S, S] with ink = 1 and paper = 0
(Snell et al.'s convention), resized by area averaging to the model's size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Area-average uint8 [N, H, W] to [N, size, size] (no-op when already that size)."""
    if images.shape[1:] == (size, size):
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).float()[:, None]
    y = F.interpolate(x, size=(size, size), mode="area")
    return y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def to_model_input(images: Tensor | np.ndarray, size: int) -> Tensor:
    """uint8 [N, H, W] (0 = ink) -> float [N, 1, size, size] (1 = ink)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {x.dtype}")
    x = x.float()[:, None] / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return 1.0 - x
