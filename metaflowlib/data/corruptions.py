"""The 15 ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019) for small grayscale images.

`corrupt(images, name, severity, seed)` maps uint8 [N, H, W] to uint8 [N, H, W].
Every corruption works on the whole batch at once in float [0, 1] (numpy, plus
torch for convolution and resampling), then clips and rounds back to uint8.

Constants start from CIFAR-10-C (`make_cifar_c.py` in hendrycks/robustness).
Lengths in pixels (blur radii and sigmas, motion radii) are scaled by 28/32,
so a blur covers the same fraction of a 28 px image as of a 32 px one.
Constants that are already fractions of the image size (zoom and pixelate
factors, elastic parameters, which the reference writes as IMSIZE * fraction)
stay as they are: scaling them too would count the resize twice. Each
function's docstring lists its departures from the reference.

Randomness comes from one `np.random.default_rng(seed)` per call, drawn in the
same order at every severity, so severities of one seed share their noise and
differ only by their constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from io import BytesIO

import numpy as np
import torch
import torch.nn.functional as F

SCALE = 28 / 32  # pixel lengths: CIFAR-10 (32 px) -> Fashion-MNIST / Omniglot (28 px)
MIN_SIDE = 8  # smallest height/width accepted (the diamond-square map and the kernels need a few pixels)

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------- helpers


def _convolve(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """Correlate every image of x [N, H, W] with one odd-sized kernel; borders padded by np.pad `mode`."""
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = torch.from_numpy(np.pad(x, ((0, 0), (ph, ph), (pw, pw)), mode=mode))
    weight = torch.from_numpy(kernel.astype(np.float32)).expand(x.shape[0], 1, *kernel.shape)
    # images as channels of one depthwise conv: much faster on CPU than a batch of 1-channel images
    return F.conv2d(padded[None], weight, groups=x.shape[0])[0].numpy()


def _gaussian_blur(x: np.ndarray, sigma: float, truncate: float = 4.0, mode: str = "edge") -> np.ndarray:
    """skimage.filters.gaussian: separable, radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0:
        return x
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    return _convolve(_convolve(x, kernel[None, :], mode), kernel[:, None], mode)


def _shift_sum(x: np.ndarray, dx: np.ndarray, dy: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_t weights[t] * x[n, i + dy[n, t], j + dx[n, t]] with edge-replicated borders (dx, dy: [N, T] ints)."""
    n, h, w = x.shape
    pad = int(max(np.abs(dx).max(), np.abs(dy).max()))
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    batch = np.arange(n)[:, None, None]
    rows = np.arange(h)[None, :, None] + pad
    cols = np.arange(w)[None, None, :] + pad
    out = np.zeros_like(x)
    for t, weight in enumerate(weights):
        out += weight * padded[batch, rows + dy[:, t, None, None], cols + dx[:, t, None, None]]
    return out


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage: a one-sided Gaussian trail of 2*ceil(radius)+1 taps along `angle` [N] degrees."""
    taps = np.arange(2 * math.ceil(radius) + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    theta = np.deg2rad(angle)[:, None]
    dx = np.ceil(taps * np.cos(theta) - 0.5).astype(np.int64)
    dy = np.ceil(taps * np.sin(theta) - 0.5).astype(np.int64)
    return _shift_sum(x, dx, dy, (weights / weights.sum()).astype(np.float32))


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom in by `factor` about the centre, keeping the size: crop, bilinear upsample (as scipy's zoom), trim."""
    _, h, w = x.shape
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = torch.from_numpy(np.ascontiguousarray(x[:, top : top + ch, left : left + cw]))[:, None]
    size = (round(ch * factor), round(cw * factor))
    zoomed = F.interpolate(crop, size=size, mode="bilinear", align_corners=True)[:, 0].numpy()
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    return zoomed[:, top : top + h, left : left + w]


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """Defocus kernel: a disk by area coverage (16x16 samples per pixel), then a 3x3 Gaussian of sigma alias_blur."""
    half = math.ceil(radius) + 1
    samples = (np.arange(16) + 0.5) / 16 - 0.5
    axis = (np.arange(-half, half + 1)[:, None] + samples[None, :]) ** 2  # [K, 16]
    inside = axis[:, None, :, None] + axis[None, :, None, :] <= radius**2  # [K, K, 16, 16]
    disk = inside.mean(axis=(2, 3))
    blur = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur**2))
    blur /= blur.sum()
    padded = np.pad(disk, 1)
    size = disk.shape[0]
    kernel = sum(blur[i] * blur[j] * padded[i : i + size, j : j + size] for i in range(3) for j in range(3))
    return kernel / kernel.sum()


def _plasma_fractal(rng: np.random.Generator, n: int, mapsize: int, wibbledecay: float) -> np.ndarray:
    """Diamond-square height maps [n, mapsize, mapsize] in [0, 1], as the reference's plasma_fractal, batched."""
    maps = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)  # wibble**2: as in the reference

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        square = corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, half::step] = wibbled_mean(square + np.roll(square, -1, axis=2))
        centres, corners = maps[:, half::step, half::step], maps[:, ::step, ::step]
        maps[:, ::step, half::step] = wibbled_mean(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        )
        maps[:, half::step, ::step] = wibbled_mean(
            centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        )
        step, wibble = half, wibble / wibbledecay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def _frost_texture(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Procedural stand-in for the reference's frost photographs: [n, h, w] in [0, 1].

    A dim haze (blurred noise) plus six-armed ice crystals: sparse seeds,
    denser where the haze is, drawn out into needles along three directions
    60 degrees apart, rotated at random per image; the brightest needle wins
    where crystals overlap.
    """
    haze = _gaussian_blur(rng.random((n, h, w), dtype=np.float32), sigma=1.5)
    haze -= haze.min(axis=(1, 2), keepdims=True)
    haze /= haze.max(axis=(1, 2), keepdims=True)
    # crystals cluster where the haze is dense: seed probability 0.08 * haze, about 4% on average
    seeds = np.where(rng.random((n, h, w)) < 0.08 * haze, rng.uniform(0.6, 1.0, (n, h, w)), 0).astype(np.float32)
    length = 3  # needle half-length in pixels
    taps = np.arange(-length, length + 1)
    weights = (1 - np.abs(taps) / (length + 1)).astype(np.float32)
    rotation = rng.uniform(0, 60, n)
    needles = np.zeros_like(seeds)
    for arm in range(3):
        theta = np.deg2rad(rotation + 60 * arm)[:, None]
        dx = np.round(taps * np.cos(theta)).astype(np.int64)
        dy = np.round(taps * np.sin(theta)).astype(np.int64)
        needles = np.maximum(needles, _shift_sum(seeds, dx, dy, weights))
    return np.clip(0.35 * haze + needles, 0, 1)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round (the reference truncates; rounding keeps an identity map exact)."""
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------- noise


def _gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise (sensor read noise)."""
    std = {
        1: 0.04,
        2: 0.06,
        3: 0.08,
        4: 0.09,
        5: 0.10,
    }[severity]
    return x + std * rng.standard_normal(x.shape, dtype=np.float32)


def _shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise: `photons` photons make full white."""
    photons = {
        1: 500,
        2: 250,
        3: 100,
        4: 75,
        5: 50,
    }[severity]
    return (rng.poisson(x * photons) / photons).astype(np.float32)


def _impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper: a fraction `amount` of pixels set to black or white (half each), as skimage's 's&p'."""
    amount = {
        1: 0.01,
        2: 0.02,
        3: 0.03,
        4: 0.05,
        5: 0.07,
    }[severity]
    u = rng.random(x.shape, dtype=np.float32)  # one draw for every severity: hit pixels are nested
    return np.where(u < amount / 2, 0, np.where(u < amount, 1, x)).astype(np.float32)


# ---------------------------------------------------------------- blur


def _defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Out-of-focus lens: convolution with an anti-aliased disk.

    The reference thresholds a disk of radius 0.3, 0.4, 0.5, 1, 1.5 px on the
    integer grid, which keeps 1, 1, 1, 5, 9 pixels. Departure: we sample the
    disk by area coverage, with the radius that gives the same area scaled by
    28/32; scaling the radii themselves would leave a single pixel at
    severities 1-4 (a radius under 1 px keeps only the centre on the grid).
    """
    grid_pixels, alias_blur = {  # pixels in the reference's grid disk; sigma (px at 32) of its 3x3 anti-aliasing
        1: (1, 0.4),
        2: (1, 0.5),
        3: (1, 0.6),
        4: (5, 0.2),
        5: (9, 0.1),
    }[severity]
    kernel = _disk(math.sqrt(grid_pixels / math.pi) * SCALE, alias_blur * SCALE)
    return _convolve(x, kernel, mode="reflect")


def _glass_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Frosted glass: blur, jitter every pixel by up to `max_delta`, blur again.

    The reference's per-pixel "swap" assigns numpy views, so it copies the
    neighbour's value instead of swapping; and with offsets in
    [-max_delta, max_delta) = {-1, 0} visited bottom-right to top-left, every
    source is still untouched when read. One gather per iteration therefore
    equals its sequential loop. Departure: no uint8 rounding between steps.
    """
    sigma, max_delta, iterations = {  # sigma in px (CIFAR * 28/32); the 1 px jitter stays 1 px
        1: (0.05 * SCALE, 1, 1),
        2: (0.25 * SCALE, 1, 1),
        3: (0.40 * SCALE, 1, 1),
        4: (0.25 * SCALE, 1, 2),
        5: (0.40 * SCALE, 1, 2),
    }[severity]
    n, h, w = x.shape
    offsets = rng.integers(-max_delta, max_delta, size=(iterations, 2, n, h, w))
    batch = np.arange(n)[:, None, None]
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    # the reference visits rows and columns max_delta + 1 .. side - max_delta
    moved = ((rows > max_delta) & (rows <= h - max_delta)) & ((cols > max_delta) & (cols <= w - max_delta))
    x = _gaussian_blur(x, sigma)
    for dy, dx in offsets:
        x = x[batch, np.where(moved, rows + dy, rows), np.where(moved, cols + dx, cols)]
    return _gaussian_blur(x, sigma)


def _motion_blur_corruption(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Camera shake: a one-sided Gaussian trail at a random angle in [-45, 45] degrees per image."""
    radius, sigma = {  # px (CIFAR * 28/32)
        1: (6 * SCALE, 1.0 * SCALE),
        2: (6 * SCALE, 1.5 * SCALE),
        3: (6 * SCALE, 2.0 * SCALE),
        4: (8 * SCALE, 2.0 * SCALE),
        5: (9 * SCALE, 2.5 * SCALE),
    }[severity]
    return _motion_blur(x, radius, sigma, rng.uniform(-45, 45, x.shape[0]))


def _zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Moving towards the camera: the mean of the image and its zooms 1.00, 1.01, ..., `largest`.

    The largest zooms are what the reference's np.arange(1, stop, 0.01) really
    yields (1.06 and 1.11 for stops 1.06 and 1.11, by floating point rounding).
    """
    largest = {  # zoom factor: a fraction of the image size, so not rescaled
        1: 1.06,
        2: 1.11,
        3: 1.15,
        4: 1.20,
        5: 1.25,
    }[severity]
    factors = np.linspace(1, largest, round((largest - 1) / 0.01) + 1)
    return (x + sum(_clipped_zoom(x, factor) for factor in factors)) / (len(factors) + 1)


# ---------------------------------------------------------------- weather


def _snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Falling snow: thresholded noise flakes streaked by motion blur, added twice (as is and rotated 180 degrees).

    The scene is first lightened towards white (`keep` of the image stays).
    Departure: the flake layer is not quantised to 8 bits before the blur.
    """
    mean, std, zoom, threshold, radius, sigma, keep = {  # flake layer; zoom: fraction; radius, sigma: px * 28/32
        1: (0.10, 0.2, 1.00, 0.60, 8 * SCALE, 3 * SCALE, 0.95),
        2: (0.10, 0.2, 1.00, 0.50, 10 * SCALE, 4 * SCALE, 0.90),
        3: (0.15, 0.3, 1.75, 0.55, 10 * SCALE, 4 * SCALE, 0.90),
        4: (0.25, 0.3, 2.25, 0.60, 12 * SCALE, 6 * SCALE, 0.85),
        5: (0.30, 0.3, 1.25, 0.65, 14 * SCALE, 12 * SCALE, 0.80),
    }[severity]
    flakes = _clipped_zoom(mean + std * rng.standard_normal(x.shape, dtype=np.float32), zoom)
    flakes = np.clip(np.where(flakes < threshold, 0, flakes), 0, 1)
    flakes = _motion_blur(flakes, radius, sigma, rng.uniform(-135, -45, x.shape[0]))
    x = keep * x + (1 - keep) * np.maximum(x, x * 1.5 + 0.5)
    return x + flakes + flakes[:, ::-1, ::-1]


def _frost(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Ice on the lens: `keep` * image + `frost` * a frost texture.

    Departure: the reference crops one of six frost photographs; no image
    files ship here, so the texture is synthesised (`_frost_texture`).
    """
    keep, frost = {
        1: (1.00, 0.20),
        2: (1.00, 0.30),
        3: (0.90, 0.40),
        4: (0.85, 0.40),
        5: (0.75, 0.45),
    }[severity]
    return keep * x + frost * _frost_texture(rng, *x.shape)


def _fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Fog: a diamond-square plasma of roughness `wibbledecay` added with weight `density`, contrast renormalised."""
    density, wibbledecay = {
        1: (0.20, 3.00),
        2: (0.50, 3.00),
        3: (0.75, 2.50),
        4: (1.00, 2.00),
        5: (1.50, 1.75),
    }[severity]
    n, h, w = x.shape
    mapsize = 1 << (max(h, w) - 1).bit_length()  # the reference uses 32 for 32x32 and 256 for 224x224
    plasma = _plasma_fractal(rng, n, mapsize, wibbledecay)[:, :h, :w].astype(np.float32)
    peak = x.max(axis=(1, 2), keepdims=True)
    return (x + density * plasma) * peak / (peak + density)


def _brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Daylight: add to HSV value; for gray pixels V is the intensity, so this is x + shift."""
    shift = {
        1: 0.05,
        2: 0.10,
        3: 0.15,
        4: 0.20,
        5: 0.30,
    }[severity]
    return x + shift


# ---------------------------------------------------------------- digital


def _contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Low contrast: shrink each image towards its mean by `factor`."""
    factor = {
        1: 0.75,
        2: 0.50,
        3: 0.40,
        4: 0.30,
        5: 0.15,
    }[severity]
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * factor + mean


def _elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Elastic warp (Simard et al. 2003): a random affine, then a smoothed random displacement field.

    The affine moves three control points by up to `affine`; the field is
    uniform noise smoothed by a Gaussian of `sigma` and scaled by `alpha`; all
    three are fractions of the image size, as in the reference. Departures:
    the reference's affine column runs 0.08 down to 0.03, so its severity 1 (a
    pure affine) moves pixels further than its severity 5; the same five
    values are used in increasing order, so distortion grows with severity.
    The affine and the field are composed into one bilinear resampling (the
    reference resamples twice).
    """
    alpha, sigma, affine = {  # fractions of the image size
        1: (0.00, 0.00, 0.03),
        2: (0.05, 0.20, 0.05),
        3: (0.08, 0.06, 0.06),
        4: (0.10, 0.04, 0.07),
        5: (0.10, 0.03, 0.08),
    }[severity]
    n, h, w = x.shape
    size = min(h, w)
    # affine (cv2.getAffineTransform): three control points around the centre, each jittered; points are (x, y)
    centre, arm = np.array([w // 2, h // 2], dtype=np.float64), size // 3
    points = np.stack([centre + arm, centre + [arm, -arm], centre - arm])  # [3, 2]
    moved = points + rng.uniform(-affine * size, affine * size, size=(n, 3, 2))
    # inverse map (output -> source) solves [moved, 1] @ A = points for A [n, 3, 2]
    inverse = np.linalg.solve(np.concatenate([moved, np.ones((n, 3, 1))], axis=2), np.broadcast_to(points, (n, 3, 2)))
    field = rng.uniform(-1, 1, size=(2 * n, h, w)).astype(np.float32)  # drawn at every severity, even alpha = 0
    field = _gaussian_blur(field, sigma * size, truncate=3.0, mode="symmetric") * (alpha * size)
    dx, dy = field[:n], field[n:]
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    warped = np.stack([cols + dx, rows + dy, np.ones_like(dx)], axis=-1).reshape(n, h * w, 3)  # homogeneous (x, y, 1)
    source = (warped @ inverse).reshape(n, h, w, 2)  # (x, y)
    grid = torch.from_numpy(2 * source / [w - 1, h - 1] - 1).float()
    image = torch.from_numpy(x)[:, None]
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=True)[:, 0].numpy()


def _pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Low resolution: PIL BOX resize to `fraction` of the size and back (BOX upsampling is nearest neighbour)."""
    fraction = {  # of the image size, so not rescaled: 28 px -> 26, 25, 23, 21, 18 px
        1: 0.95,
        2: 0.90,
        3: 0.85,
        4: 0.75,
        5: 0.65,
    }[severity]
    _, h, w = x.shape
    small_h, small_w = int(h * fraction), int(w * fraction)
    return _box_resize(_box_resize(x, small_h, small_w), h, w)


def _box_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """PIL's Image.resize(..., BOX) as two matrix products."""
    return _box_weights(x.shape[1], h) @ x @ _box_weights(x.shape[2], w).T


def _box_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] averaging weights of Pillow's BOX filter (precompute_coeffs in Resample.c).

    Output pixel o averages the inputs whose centres fall in its box, within
    Pillow's rounded window; when enlarging this is nearest neighbour.
    """
    scale = size_in / size_out
    support = max(scale, 1.0)  # the box widens only when shrinking
    centre = (np.arange(size_out)[:, None] + 0.5) * scale
    first, stop = np.floor(centre - support / 2 + 0.5), np.floor(centre + support / 2 + 0.5)
    inputs = np.arange(size_in)[None, :]
    position = (inputs + 0.5 - centre) / support
    inside = (inputs >= first) & (inputs < stop) & (position > -0.5) & (position <= 0.5)
    weights = inside.astype(np.float32)
    return weights / weights.sum(axis=1, keepdims=True)


def _jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG artefacts: a PIL encode/decode round trip at `quality` (one call per image; libjpeg has no batch API)."""
    from PIL import Image

    quality = {
        1: 80,
        2: 65,
        3: 58,
        4: 50,
        5: 40,
    }[severity]
    out = np.empty_like(x)
    for i, image in enumerate(_to_uint8(x)):
        buffer = BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer), dtype=np.float32) / 255
    return out


_CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
CORRUPTIONS: tuple[str, ...] = tuple(_CORRUPTIONS)  # ImageNet-C order: noise, blur, weather, digital
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt a batch of grayscale images: uint8 [N, H, W] (0 black, 255 white) -> uint8 [N, H, W].

    RGB images [N, H, W, 3] are corrupted channel by channel with the same random draws, so blur geometry, noise
    and occluders line up across channels (CIFAR-10-C draws noise per channel; the difference is colour noise).
    Deterministic in (images, name, severity, seed). Raises ValueError for an
    unknown name, a severity outside 1..5, or images that are not uint8
    [N, H, W] or [N, H, W, 3] with H, W >= 8.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
        return np.stack([corrupt(np.ascontiguousarray(images[..., c]), name, severity, seed) for c in range(3)], axis=-1)
    if name not in _CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        got = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images)
        raise ValueError(f"images must be a uint8 array [N, H, W] or [N, H, W, 3], got {got}")
    if min(images.shape[1:]) < MIN_SIDE:
        raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE}, got {images.shape[1]}x{images.shape[2]}")
    if images.shape[0] == 0:
        return images.copy()
    x = images.astype(np.float32) / 255
    out = _CORRUPTIONS[name](x, int(severity), np.random.default_rng(seed))
    return _to_uint8(out)
