"""Reading one image file of any mode into the uint8 arrays the rest of the code takes: used by prepare (custom
datasets) and by `metaflowlib predict` (folders), so both convert alike. PIL is imported inside the functions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from metaflowlib.errors import DataError

SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL would clip these at 255 instead of scaling them


def rgb_array(image) -> np.ndarray:
    """A PIL image of any mode as uint8 [H, W, 3]: transparency (RGBA, LA, PA, P with a transparent colour) composited
    over white, as on paper or a web page; 16-bit grayscale scaled to 8 bits; the rest converted by PIL (CMYK, YCbCr...)."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT:
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return np.array(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def with_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W, 3] as [H, W] (channels 1: PIL's ITU-R 601-2 luma, "L") or unchanged (channels 3)."""
    from PIL import Image

    return np.array(Image.fromarray(rgb).convert("L")) if channels == 1 else rgb


def has_colour(rgb: np.ndarray) -> bool:
    """Some pixel with R != G or G != B."""
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def read_rgb(source: str | Path | bytes, origin: str | Path) -> tuple[np.ndarray, str]:
    """(uint8 [H, W, 3], the file's PIL mode) of a path or encoded bytes; an unreadable one is a DataError naming `origin`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return rgb_array(image), image.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # unidentified, truncated or huge
        raise DataError(f"{origin} is not a readable image: {error}") from None


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """One file as uint8 [H, W] (channels 1) or [H, W, 3]."""
    return with_channels(read_rgb(Path(path), path)[0], channels)
