"""Stage `prepare`: source data -> class-disjoint train/val/test splits (Arrow) in data/prepared/."""

from __future__ import annotations

from _stage import PREPARED, ROOT, params, run_guarded

from metaflowlib.config import Params
from metaflowlib.data.omniglot import find_source, load_omniglot, vinyals_split_dir
from metaflowlib.data.prepare import (custom_format, custom_splits, lake_splits, load_image_dataset, save_splits,
                                      vinyals_splits)
from metaflowlib.data.preprocess import ImageFormat


def prepare(p: Params) -> dict:
    """Write data/prepared; return what its info.json holds."""
    data = p.data
    if data.dataset == "custom":
        loaded = load_image_dataset(data.custom_source, data.image_size, data.channels)
        splits = custom_splits(loaded.images, loaded.labels, loaded.class_names, data.image_size, data.split_fractions,
                               data.split_seed)
        origin, fmt, extra = data.custom_source, custom_format(splits["train"]), {"conversions": loaded.conversions}
    else:
        root = find_source(data.source, ROOT)
        sets = load_omniglot(root, ROOT / "data" / "downloads", verify=data.verify_checksums)
        if data.protocol == "vinyals":
            split_dir = vinyals_split_dir(root, ROOT / "data" / "downloads")
            splits = vinyals_splits(sets, split_dir, data.image_size)
        else:
            splits = lake_splits(sets, data.image_size, data.lake_val_alphabets)
        origin, fmt, extra = str(root) if root else "official download", ImageFormat.ink(data.image_size), {}
    info = {"dataset": data.name, "source": origin, "image_size": data.image_size, "verified": data.verify_checksums,
            "format": fmt.to_dict(), **extra}
    return save_splits(splits, PREPARED, info, as_png=data.dataset == "custom")


def main() -> None:
    info = prepare(params())
    summary = ", ".join(f"{name} {s['classes']} classes/{s['examples']} images" for name, s in info["splits"].items())
    converted = "".join(f", {key} {n}" for key, n in info.get("conversions", {}).items())
    print(f"prepare: wrote {PREPARED.relative_to(ROOT)} ({summary}; {info['format']['channels']} channel(s){converted})")


if __name__ == "__main__":
    run_guarded(main)
