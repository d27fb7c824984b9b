"""The one image preprocessing used in training, evaluation and serving.

Stored and served images are uint8: [N, H, W] grayscale or [N, H, W, 3] RGB. How they become model
inputs float [N, C, S, S] is an `ImageFormat`, chosen by the data at prepare time, written to the
prepared data's info.json and stored with every omega, so serving repeats it exactly:
- ink on paper (Omniglot): 0 = black ink, 255 = white paper; models see ink = 1, paper = 0
  (Snell et al.'s convention).
- photographs (custom data): x / 255, standardized per channel with the mean and std of the
  train split.
Images of another size are resized with the aspect ratio kept, shorter side to S, then centre-cropped
to S x S (area averaging when shrinking, bilinear when enlarging).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CHANNELS = (1, 3)


@dataclass(frozen=True)
class ImageFormat:
    """What a model's input is: channels, side, and how uint8 values map to floats."""

    channels: int = 1
    image_size: int = 28
    ink_on_paper: bool = True  # 0 = ink, 255 = paper, inverted for the model (grayscale only)
    mean: tuple[float, ...] | None = None  # per channel, of x / 255 over the train split; None: not standardized
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.channels not in CHANNELS:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.ink_on_paper and self.channels != 1:
            raise ValueError("ink_on_paper images are grayscale: channels must be 1")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are given together or not at all")
        for name, stats in (("mean", self.mean), ("std", self.std)):
            if stats is not None and len(stats) != self.channels:
                raise ValueError(f"{name} has {len(stats)} values for {self.channels} channel(s)")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def ink(cls, image_size: int) -> ImageFormat:
        """Omniglot's format at this side: grayscale, ink on paper, not standardized."""
        return cls(channels=1, image_size=image_size, ink_on_paper=True)

    @property
    def shape(self) -> tuple[int, int, int]:
        """A model input's [C, S, S]."""
        return (self.channels, self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; `from_dict` reads it back."""
        out = asdict(self)
        for key in ("mean", "std"):
            out[key] = None if out[key] is None else list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageFormat:
        mean, std = data.get("mean"), data.get("std")
        return cls(
            channels=int(data.get("channels", 1)), image_size=int(data["image_size"]),
            ink_on_paper=bool(data.get("ink_on_paper", True)),
            mean=None if mean is None else tuple(float(v) for v in mean), std=None if std is None else tuple(float(v) for v in std),
        )


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, C] to side `size`: aspect kept, shorter side to `size`, centre crop
    (no-op when already that size). Square images are only resized (area averaging for Omniglot)."""
    if images.shape[1:3] == (size, size):
        return images
    height, width = images.shape[1:3]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    x = torch.from_numpy(images.astype(np.float32))  # a copy: PIL's arrays are read-only, which torch warns about
    x = x[:, None] if images.ndim == 3 else x.permute(0, 3, 1, 2)
    shrinking = target[0] <= height and target[1] <= width
    y = F.interpolate(x, size=target, mode="area") if shrinking else F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=False)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    y = y[:, :, top : top + size, left : left + size]
    y = y[:, 0] if images.ndim == 3 else y.permute(0, 2, 3, 1)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def fit_images(images: Sequence[np.ndarray] | np.ndarray, fmt: ImageFormat) -> np.ndarray:
    """Images of any sizes, grayscale [H, W] or RGB [H, W, 3], as one uint8 array in `fmt`'s stored layout:
    [N, S, S] (channels 1) or [N, S, S, 3]. Grayscale becomes RGB by repetition, RGB grayscale by ITU-R 601-2
    luma (PIL's "L" conversion). Anything else is a ValueError naming the image's index."""
    out = []
    for index, image in enumerate(images):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"image {index} must be uint8, got {array.dtype}")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            array = array if fmt.channels == 1 else np.repeat(array[..., None], 3, axis=2)
        elif array.ndim == 3 and array.shape[2] == 3:
            if fmt.channels == 1:
                luma = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
                array = np.clip(np.round(luma), 0, 255).astype(np.uint8)
        else:
            raise ValueError(f"image {index} has shape {list(array.shape)}: expected [H, W] or [H, W, 3]")
        out.append(resize_uint8(array[None], fmt.image_size)[0])
    if not out:
        raise ValueError("no images")
    return np.stack(out)


def to_model_input(images: Tensor | np.ndarray, fmt: ImageFormat | int) -> Tensor:
    """uint8 [N, H, W] or [N, H, W, 3] -> float [N, C, S, S] as `fmt` says (an int: Omniglot's format at that side)."""
    fmt = ImageFormat.ink(fmt) if isinstance(fmt, int) else fmt
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {x.dtype}")
    channels = 1 if x.dim() == 3 else x.shape[-1]
    if x.dim() not in (3, 4) or channels != fmt.channels:
        raise ValueError(f"images of shape {list(x.shape)} do not match the format's {fmt.channels} channel(s)")
    x = (x.float()[:, None] if x.dim() == 3 else x.float().permute(0, 3, 1, 2)) / 255.0
    if x.shape[-2:] != (fmt.image_size, fmt.image_size):
        if x.shape[-1] == x.shape[-2]:
            x = F.interpolate(x, size=(fmt.image_size, fmt.image_size), mode="area")
        else:
            raise ValueError(f"images are {x.shape[-2]}x{x.shape[-1]}: fit them to {fmt.image_size}x{fmt.image_size} first (fit_images)")
    if fmt.ink_on_paper:
        return 1.0 - x
    if fmt.mean is not None:
        mean = torch.tensor(fmt.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(fmt.std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def channel_statistics(images: np.ndarray, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of x / 255 over uint8 [N, H, W] or [N, H, W, C], accumulated in float64 by chunks."""
    channels = 1 if images.ndim == 3 else images.shape[-1]
    total, sums, squares = 0, np.zeros(channels), np.zeros(channels)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total, sums, squares = total + x.shape[0], sums + x.sum(0), squares + (x * x).sum(0)
    mean = sums / total
    std = np.sqrt(np.maximum(squares / total - mean**2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
