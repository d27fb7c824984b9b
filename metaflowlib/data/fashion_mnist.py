"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from its four official IDX files.

Read from, in order: an explicit source, `$METAFLOWLIB_DATA`, `../shared/data`,
else the official files are downloaded into `data/downloads/`. A source is a
directory holding the four `.gz` files, or a data root holding them under
`fashion-mnist/`. Every file is checked by SHA-256 before it is parsed.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaflowlib.data.omniglot import download, find_source, verify_file
from metaflowlib.errors import DataError

FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
FILE_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{file}"  # the upstream README's links
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


@dataclass(frozen=True)
class Split:
    """images uint8 [N, 28, 28] (0 = black background, 255 = white), labels int64 [N] in 0..9."""

    images: np.ndarray
    labels: np.ndarray


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One gzipped IDX file of unsigned bytes, shaped as its header says; any defect names the file."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path} as gzip: {error}") from None
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() if len(data) >= 4 else "nothing"
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes: magic {found}, expected {magic:08x}")
    shape = tuple(int.from_bytes(data[4 * (1 + i) : 4 * (2 + i)], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise DataError(f"{path}: header says {shape} ({size} bytes) but {len(data) - header} bytes follow it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def files_directory(root: Path) -> Path:
    """The directory of the four files: `root/fashion-mnist/` if present, else `root` itself."""
    nested = root / "fashion-mnist"
    return nested if nested.is_dir() else root


def load_split(directory: Path, split: str, verify: bool = True) -> Split:
    paths = {kind: directory / FILES[(split, kind)] for kind in ("images", "labels")}
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"missing Fashion-MNIST file {path}")
        if verify:
            verify_file(path, FILE_SHA256[path.name])
    images = read_idx(paths["images"], IMAGES_MAGIC)
    labels = read_idx(paths["labels"], LABELS_MAGIC).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths['images']} holds {images.shape[0]} images but {paths['labels']} {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"{paths['labels']}: label {labels.max()} outside 0..{len(CLASSES) - 1}")
    return Split(images, labels)


def download_official(cache_dir: Path) -> Path:
    """Fetch the four official files into `cache_dir` (once); returns that directory."""
    for name in FILE_SHA256:
        target = cache_dir / name
        if not target.exists():
            download(DOWNLOAD_URL.format(file=name), target)
    return cache_dir


def load_fashion_mnist(
    explicit: str | None, project_root: Path, splits: tuple[str, ...] = ("train", "test"), verify: bool = True
) -> dict[str, Split]:
    """The requested splits from the first source found (see the module docstring)."""
    root = find_source(explicit, project_root)
    if root is None:
        directory = download_official(project_root / "data" / "downloads" / "fashion-mnist")
    else:
        directory = files_directory(root)
    return {split: load_split(directory, split, verify) for split in splits}
