"""A few-shot task from folders: `support/<class name>/<images>` and `query/**/<images>` (`metaflowlib predict`).

Images of any size and mode are read as prepare reads a custom dataset's (metaflowlib.data.images) and converted to
the model's channels: "L" for grayscale models, "RGB" otherwise, transparency composited over white first.
Fitting them to the model's size is the predict contract's (metaflowlib.serving.contract). A folder that
cannot make a task is one DataError naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metaflowlib.data.images import read_image
from metaflowlib.errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


def _directory(path: str | Path, role: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{role} folder {path} {'is not a directory' if path.exists() else 'does not exist'}")
    return path


def _image_files(directory: Path) -> list[Path]:
    """Image files under `directory`, at any depth, sorted; hidden files and other suffixes are not images."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))


def read_support(directory: str | Path, channels: int) -> tuple[list[np.ndarray], list[str]]:
    """(images, class name of each): one subfolder per class, named by it, with at least one image; >= 2 classes."""
    root = _directory(directory, "support")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        found = f"only {classes[0].name!r}" if classes else "none"
        raise DataError(f"support folder {root} needs one subfolder per class, at least 2; found {found}")
    images, labels = [], []
    for folder in classes:
        files = _image_files(folder)
        if not files:
            raise DataError(f"class folder {folder} has no images ({', '.join(SUFFIXES)})")
        images += [read_image(f, channels) for f in files]
        labels += [folder.name] * len(files)
    return images, labels


def read_query(directory: str | Path, channels: int) -> tuple[list[Path], list[np.ndarray]]:
    """(paths, images) of every image file under the folder, at any depth, sorted by path."""
    root = _directory(directory, "query")
    files = _image_files(root)
    if not files:
        raise DataError(f"query folder {root} has no images ({', '.join(SUFFIXES)})")
    return files, [read_image(f, channels) for f in files]
