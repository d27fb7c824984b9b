"""Stage `prepare`: source data -> class-disjoint train/val/test splits (Arrow) in data/prepared/."""

from __future__ import annotations

from _stage import PREPARED, ROOT, params, run_guarded

from metaflowlib.config import Params
from metaflowlib.data.omniglot import find_source, load_omniglot, vinyals_split_dir
from metaflowlib.data.prepare import custom_splits, lake_splits, load_image_dataset, save_splits, vinyals_splits


def prepare(p: Params) -> dict:
    data = p.data
    if data.dataset == "custom":
        images, labels, names = load_image_dataset(data.custom_source)
        splits = custom_splits(images, labels, names, data.image_size, data.split_fractions, data.split_seed)
        origin = data.custom_source
    else:
        root = find_source(data.source, ROOT)
        sets = load_omniglot(root, ROOT / "data" / "downloads", verify=data.verify_checksums)
        if data.protocol == "vinyals":
            split_dir = vinyals_split_dir(root, ROOT / "data" / "downloads")
            splits = vinyals_splits(sets, split_dir, data.image_size)
        else:
            splits = lake_splits(sets, data.image_size, data.lake_val_alphabets)
        origin = str(root) if root else "official download"
    info = {"dataset": data.name, "source": origin, "image_size": data.image_size, "verified": data.verify_checksums}
    save_splits(splits, PREPARED, info)
    return {name: (len(s.class_names), len(s.labels)) for name, s in splits.items()}


def main() -> None:
    counts = prepare(params())
    summary = ", ".join(f"{name} {c} classes/{n} images" for name, (c, n) in counts.items())
    print(f"prepare: wrote {PREPARED.relative_to(ROOT)} ({summary})")


if __name__ == "__main__":
    run_guarded(main)
