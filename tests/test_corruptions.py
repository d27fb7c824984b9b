"""ImageNet-C corruptions on small grayscale images: the contract every corruption keeps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metaflowlib.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt

# corruptions that draw random numbers: their output must depend on the seed
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
}


def structured_images(side: int = 28) -> np.ndarray:
    """[8, side, side] uint8: strokes on white (Omniglot-like), bright shapes on black (Fashion-MNIST-like)."""
    rows, cols = np.mgrid[:side, :side] * (28 / side)
    radius = np.hypot(rows - 14, cols - 14)
    white = np.full((4, side, side), 255, dtype=np.uint8)
    white[0][(cols >= 8) & (cols < 11) & (rows >= 6) & (rows < 22)] = 0  # a T
    white[0][(rows >= 12) & (rows < 15) & (cols >= 8) & (cols < 22)] = 0
    white[1][np.abs(radius - 8) < 1.5] = 0  # a ring
    white[2][(np.abs(rows - cols) < 2) | (np.abs(rows + cols - 27) < 2)] = 0  # an X
    white[3][(rows >= 20) & (rows < 23) & (cols >= 4) & (cols < 24)] = 90  # a gray bar
    black = np.zeros((4, side, side), dtype=np.uint8)
    black[0][(rows >= 5) & (rows < 23) & (cols >= 7) & (cols < 21)] = 200  # a shirt
    black[0][(rows >= 5) & (rows < 12) & (cols >= 3) & (cols < 25)] = 230
    black[1][radius < 9] = 160  # a disc with a bright core
    black[1][radius < 4] = 250
    black[2] = np.clip(cols * 9, 0, 255).astype(np.uint8)  # a ramp with a dark square
    black[2][(rows >= 10) & (rows < 18) & (cols >= 10) & (cols < 18)] = 30
    black[3][(rows >= 4) & (rows < 24) & ((cols < 10) | (cols >= 18)) & (cols >= 6) & (cols < 22)] = 180  # trousers
    black[3][(rows >= 4) & (rows < 8) & (cols >= 6) & (cols < 22)] = 180
    return np.concatenate([white, black])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return structured_images()


def test_names_follow_imagenet_c_order() -> None:
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise",
        "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness",
        "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    )  # fmt: skip


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_keeps_shape_and_dtype_and_changes_the_image(images: np.ndarray, name: str) -> None:
    before = images.copy()
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert not np.array_equal(out, images), f"{name} severity {severity} left the images unchanged"
    np.testing.assert_array_equal(images, before)  # the input is not modified


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 20, 37)])
def test_other_sizes(name: str, shape: tuple[int, int, int]) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = corrupt(images, name, 5, seed=0)
    assert out.shape == shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_per_seed(images: np.ndarray, name: str) -> None:
    first = corrupt(images, name, 3, seed=1)
    np.testing.assert_array_equal(first, corrupt(images.copy(), name, 3, seed=1))
    if name in RANDOM:
        assert not np.array_equal(first, corrupt(images, name, 3, seed=2))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_distance_from_clean_grows_with_severity(images: np.ndarray, name: str) -> None:
    clean = images.astype(np.float64)
    distance = [np.abs(corrupt(images, name, s, seed=0) - clean).mean() for s in SEVERITIES]
    assert all(b >= a for a, b in zip(distance, distance[1:])), f"{name}: {np.round(distance, 2)}"
    assert distance[-1] > distance[0], f"{name}: {np.round(distance, 2)}"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_bad_severity_and_images_raise(images: np.ndarray, name: str) -> None:
    for severity in (0, 6, 2.0, "1"):
        with pytest.raises(ValueError, match=r"severity must be one of \(1, 2, 3, 4, 5\)"):
            corrupt(images, name, severity, seed=0)  # type: ignore[arg-type]
    for bad in (images.astype(np.float32), images.astype(np.int16), images[0], images[:, None], images[:, :7, :7]):
        with pytest.raises(ValueError, match="images must"):
            corrupt(bad, name, 1, seed=0)


def test_unknown_name_lists_the_allowed_ones(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="'gaussian_blur'.*gaussian_noise.*jpeg_compression"):
        corrupt(images, "gaussian_blur", 1, seed=0)


@pytest.mark.parametrize("side", [28, 30])
def test_pixelate_matches_pil_box_resize(side: int) -> None:
    images = structured_images(side)
    for severity, fraction in zip(SEVERITIES, (0.95, 0.9, 0.85, 0.75, 0.65)):
        small = int(side * fraction)
        box = Image.Resampling.BOX
        expected = [
            np.asarray(Image.fromarray(im).resize((small, small), box).resize((side, side), box)) for im in images
        ]
        out = corrupt(images, "pixelate", severity, seed=0)
        # PIL rounds the small image to 8 bits before upsampling; we round once at the end
        assert np.abs(out.astype(np.int16) - np.stack(expected)).max() <= 1


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_batch_of_2000_corrupts_every_image_on_its_own(images: np.ndarray, name: str) -> None:
    """The 8 images tiled to 2000 in one call (bench/corruption_speed.py times it): a corruption without randomness
    gives every image what it gives that image alone; a random one draws new noise for every image, so the 250
    copies of an image all come out different."""
    batch = np.resize(images, (2000, *images.shape[1:]))
    out = corrupt(batch, name, 5, seed=0)
    assert out.shape == batch.shape and out.dtype == np.uint8
    if name in RANDOM:
        # motion blur draws only an angle, and many angles rasterise to the same trail (about 40 of 250 differ)
        least = 25 if name == "motion_blur" else 250
        for k in range(len(images)):
            copies = {image.tobytes() for image in out[k :: len(images)]}
            assert len(copies) >= least, f"{name}: the copies of image {k} have {len(copies)} different outputs"
    else:
        alone = np.concatenate([corrupt(image[None], name, 5, seed=0) for image in images])
        np.testing.assert_array_equal(out, np.resize(alone, out.shape))


@pytest.mark.parametrize("name", ["gaussian_noise", "motion_blur", "snow", "contrast"])
def test_rgb_images_are_corrupted_channel_by_channel_with_shared_draws(images: np.ndarray, name: str) -> None:
    """A gray picture in RGB comes out as the gray corruption in every channel; colour channels stay aligned."""
    gray = images[:8]
    rgb = corrupt(np.repeat(gray[..., None], 3, axis=-1), name, 3, seed=5)
    assert rgb.shape == (*gray.shape, 3) and rgb.dtype == np.uint8
    expected = corrupt(gray, name, 3, seed=5)
    assert all(np.array_equal(rgb[..., c], expected) for c in range(3))
