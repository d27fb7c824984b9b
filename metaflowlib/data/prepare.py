"""Turn a source into class-disjoint train/val/test splits saved as Hugging Face datasets (Arrow).

Protocols:
- vinyals: the 1028/172/423-character split of Vinyals et al. 2016 (as used by
  Snell et al. 2017), each 90-degree rotation its own class -> 4112/688/1692 classes.
- lake: background alphabets for meta-training (the last `val_alphabets` of
  them, alphabetically, held out for validation), evaluation alphabets for
  testing, no rotation classes (Lake et al. 2015).
- custom: any Hugging Face image-classification dataset id or `imagefolder`
  directory, images of any size and mode (brought to one side and 1 or 3
  channels); classes are shuffled by seed and cut into disjoint splits.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from metaflowlib.data.images import has_colour, read_rgb, with_channels
from metaflowlib.data.omniglot import OmniglotSet
from metaflowlib.data.preprocess import ImageFormat, channel_statistics, resize_uint8
from metaflowlib.errors import DataError
from metaflowlib.io import atomic_path

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """uint8 images [M, S, S] (Omniglot: 0 = ink) or [M, S, S, 3] (RGB), int labels [M] (0..C-1), and class names [C]."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    info: dict = field(default_factory=dict)


def _omniglot_class_images(sets: list[OmniglotSet], size: int) -> dict[str, np.ndarray]:
    """'<alphabet>/character<k>' -> uint8 [20, size, size], resized once by area averaging."""
    out = {}
    for omniglot_set in sets:
        flat = omniglot_set.images.reshape(-1, *omniglot_set.images.shape[2:]).astype(np.uint8) * 255
        resized = resize_uint8(flat, size).reshape(len(omniglot_set.characters), -1, size, size)
        out.update({c.name: resized[i] for i, c in enumerate(omniglot_set.characters)})
    return out


def _stack(classes: list[tuple[str, np.ndarray]]) -> Split:
    if not classes:
        raise DataError("a split would have no classes")
    images = np.concatenate([imgs for _, imgs in classes])
    labels = np.concatenate([np.full(len(imgs), i, dtype=np.int32) for i, (_, imgs) in enumerate(classes)])
    return Split(images, labels, [name for name, _ in classes])


def vinyals_splits(sets: list[OmniglotSet], split_dir: Path, size: int) -> dict[str, Split]:
    """Read `<split_dir>/{train,val,test}.txt` lines '<alphabet>/character<k>/rot<deg>'."""
    characters = _omniglot_class_images(sets, size)
    splits = {}
    for split in SPLITS:
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"missing Vinyals split file {path}")
        classes = []
        for number, line in enumerate(path.read_text().split(), start=1):
            character, _, rotation = line.rpartition("/")
            if character not in characters or not rotation.startswith("rot"):
                raise DataError(f"{path}:{number}: unknown class {line!r}")
            degrees = int(rotation[3:])
            classes.append((line, np.rot90(characters[character], k=degrees // 90, axes=(1, 2)).copy()))
        splits[split] = _stack(classes)
    return splits


def lake_splits(sets: list[OmniglotSet], size: int, val_alphabets: int) -> dict[str, Split]:
    characters = _omniglot_class_images(sets, size)
    by_set = {s.name: s for s in sets}
    background = sorted({c.alphabet for c in by_set["background"].characters})
    if not 0 < val_alphabets < len(background):
        raise DataError(f"lake_val_alphabets={val_alphabets} must be between 1 and {len(background) - 1}")
    val = set(background[-val_alphabets:])

    def pick(set_name: str, keep) -> Split:
        return _stack([(c.name, characters[c.name]) for c in by_set[set_name].characters if keep(c.alphabet)])

    return {
        "train": pick("background", lambda a: a not in val),
        "val": pick("background", lambda a: a in val),
        "test": pick("evaluation", lambda a: True),
    }


def custom_splits(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], size: int, fractions: tuple[float, float, float], seed: int
) -> dict[str, Split]:
    """Class-disjoint splits of a labelled image collection, classes shuffled by `seed`."""
    classes = np.unique(labels)
    if len(classes) < 3:
        raise DataError(f"need at least 3 classes to make class-disjoint splits, found {len(classes)}")
    order = np.random.default_rng(seed).permutation(classes)
    cut1 = max(1, round(fractions[0] * len(order)))
    cut2 = max(cut1 + 1, round((fractions[0] + fractions[1]) * len(order)))
    if cut2 >= len(order):
        raise DataError(f"fractions {fractions} leave no test classes out of {len(order)}")
    resized = resize_uint8(images, size)
    groups = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    return {
        split: _stack([(class_names[c], resized[labels == c]) for c in chosen]) for split, chosen in groups.items()
    }


class ImageCollection(NamedTuple):
    """A custom dataset at the prepared side: uint8 images [M, S, S] or [M, S, S, 3], int labels [M], class names,
    and how many images were converted: `converted_mode` (to L or RGB), `resized` (to S x S)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    conversions: dict[str, int]


def load_image_dataset(reference: str, size: int, channels: int | None = None) -> ImageCollection:
    """A Hugging Face dataset id or `imagefolder` directory of any image sizes and modes, each image brought to
    `channels` (1: PIL's L, 3: RGB; None: 3 if any image has colour, i.e. a pixel with R != G or G != B after RGB
    conversion, else 1) and resized to `size` x `size` (aspect kept, shorter side to `size`, centre crop) as it is
    read, so no full-size image is kept. Transparent images are composited over white; 16-bit ones are scaled.

    Refused with a DataError naming the culprit: an unreadable image; a class with fewer than 2 images, an empty
    class folder included (no task can use it as support and query).
    """
    import datasets

    path = Path(reference).expanduser()
    try:
        if path.is_dir():
            dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        else:
            dataset = datasets.load_dataset(reference, split="train")
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the user needs the reference and the reason
        raise DataError(f"cannot load image dataset {reference!r}: {error}") from None
    image_column = next((k for k, v in dataset.features.items() if isinstance(v, datasets.Image)), None)
    label_column = next((k for k, v in dataset.features.items() if isinstance(v, datasets.ClassLabel)), None)
    if image_column is None or label_column is None:
        raise DataError(f"{reference!r} has no Image and ClassLabel columns (features: {dataset.features})")
    if len(dataset) == 0:
        raise DataError(f"{reference!r} holds no images")
    names = list(dataset.features[label_column].names)
    labels = np.asarray(dataset[label_column], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(names))
    small = [f"{names[c]} ({counts[c]})" for c in np.flatnonzero(counts < 2)]
    if path.is_dir():  # imagefolder makes no class of a folder without images
        small += [f"{d.name} (0)" for d in sorted(path.iterdir())
                  if d.is_dir() and not d.name.startswith(".") and not any(f.is_file() for f in d.rglob("*"))]
    if small:
        raise DataError(f"{reference!r}: every class needs at least 2 images (1 shot + 1 query); too few: {', '.join(small[:10])}")

    stored = 1 if channels == 1 else 3  # channels None: read as RGB, reduced to one channel at the end if all gray
    images = np.empty((len(dataset), size, size) if stored == 1 else (len(dataset), size, size, 3), np.uint8)
    modes, resized, colour = Counter(), 0, False
    rows = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    for index, row in enumerate(rows):  # one image at a time: rows are read lazily from Arrow
        item = row[image_column]
        origin = item.get("path") or f"{reference!r} example {index}"
        rgb, mode = read_rgb(item["bytes"] if item.get("bytes") else item["path"], origin)
        modes[mode] += 1
        colour = colour or (channels is None and has_colour(rgb))
        array = with_channels(rgb, stored)
        resized += array.shape[:2] != (size, size)
        images[index] = resize_uint8(array[None], size)[0]
    if channels is None and not colour:  # every image gray: its three channels are equal, before and after resizing
        images, stored = np.ascontiguousarray(images[..., 0]), 1
    converted = sum(n for mode, n in modes.items() if mode != ("L" if stored == 1 else "RGB"))
    return ImageCollection(images, labels, names, {"converted_mode": converted, "resized": resized})


def custom_format(train: Split) -> ImageFormat:
    """Photographs' model input: x / 255 standardized per channel by the train split's statistics (val and test
    stand for unseen classes: their statistics must not leak into the model)."""
    mean, std = channel_statistics(train.images)
    channels = 1 if train.images.ndim == 3 else train.images.shape[-1]
    return ImageFormat(channels, train.images.shape[1], ink_on_paper=False, mean=mean, std=std)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_splits(splits: dict[str, Split], out_dir: Path, info: dict, as_png: bool = False) -> dict:
    """Write every split as an Arrow dataset plus `info.json`, all or nothing; return what info.json holds.

    as_png False: uint8 Array2D images, int32 labels and a class_name column, as Omniglot has always been stored (its
    Arrow files, which DVC tracks, stay byte for byte). True (custom data): `datasets.Image()` PNGs at the prepared
    size and a `ClassLabel` of the split's class names, so the Hugging Face viewer shows the images and their classes.
    An `info` without a "format" is for grayscale splits in Omniglot's convention: ink on paper at their side.
    """
    from datasets import Array2D, ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    if "format" not in info:
        images = next(iter(splits.values())).images
        if images.ndim != 3:
            raise DataError(f"RGB splits ({list(images.shape[1:])}) need info['format']: their normalization is not Omniglot's")
        info = {**info, "format": ImageFormat.ink(images.shape[1]).to_dict()}

    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir()
        summary = {}
        for name, split in splits.items():
            if as_png:
                features = Features({"image": ImageFeature(), "label": ClassLabel(names=split.class_names)})
                columns = {"image": [{"bytes": _png(image), "path": None} for image in split.images], "label": split.labels}
            else:
                features = Features({"image": Array2D(split.images.shape[1:], "uint8"), "label": Value("int32"),
                                     "class_name": Value("string")})
                columns = {"image": split.images, "label": split.labels,
                           "class_name": [split.class_names[i] for i in split.labels]}
            Dataset.from_dict(columns, features=features).save_to_disk(str(tmp / name))
            summary[name] = {"classes": len(split.class_names), "examples": len(split.labels)}
        written = {**info, "splits": summary}
        (tmp / "info.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return written
