"""Seconds to load a prepared RGB split stored as PNGs (datasets.Image) vs raw uint8 (Array3D), and episodes per
second sampled from each afterwards (CPU).

    python bench/prepared_decode.py --out bench/results/prepared_decode_cpu.json

The images are smooth colour fields (8x8 random colours upsampled) plus mild noise: PNG compresses them about as
well as photographs, unlike pure noise. Each load is repeated `--repeats` times on a warm page cache; median, min
and max are reported; episode rates are medians of interleaved rounds after a warm-up round. `datasets_rows` is what the PNG split would cost through datasets' own decoding (a PIL
object per row); `load_split` decodes the PNG bytes straight from Arrow into one array.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaflowlib.data.prepare import Split, custom_format, save_splits  # noqa: E402
from metaflowlib.data.preprocess import to_model_input  # noqa: E402
from metaflowlib.data.store import load_split  # noqa: E402
from metaflowlib.episodes import EpisodeSampler, TaskPool  # noqa: E402
from metaflowlib.runtime import device_name  # noqa: E402


def images(n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    fields = F.interpolate(torch.from_numpy(rng.random((n, 3, 8, 8), dtype=np.float32)) * 255, size=(size, size), mode="bilinear")
    noisy = fields.permute(0, 2, 3, 1).numpy() + rng.normal(0, 4, (n, size, size, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def timed(load, repeats: int) -> tuple[dict[str, float], object]:
    runs, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = load()
        runs.append(time.perf_counter() - start)
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--size", type=int, default=84)  # miniImageNet's side
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)  # loads; episode rounds are one more (the first warms up)
    parser.add_argument("--episodes", type=int, default=2000)  # 5-way 5-shot 15-query
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from datasets import Array3D, Dataset, Features, Value

    split = Split(images(args.images, args.size), np.arange(args.images) % args.classes, [f"c{c}" for c in range(args.classes)])
    with tempfile.TemporaryDirectory() as tmp:
        png, raw = Path(tmp) / "png", Path(tmp) / "raw"
        save_splits({"train": split}, png, {}, as_png=True)
        features = Features({"image": Array3D(split.images.shape[1:], "uint8"), "label": Value("int32")})
        Dataset.from_dict({"image": split.images, "label": split.labels}, features=features).save_to_disk(str(raw / "train"))
        sizes = {name: sum(p.stat().st_size for p in (d / "train").glob("*.arrow")) for name, d in (("png", png), ("array3d", raw))}
        seconds, loaded = {}, {}
        for name, directory in (("png", png), ("array3d", raw)):
            seconds[name], loaded[name] = timed(lambda d=directory: load_split(d, "train"), args.repeats)
        import datasets

        rows = datasets.load_from_disk(str(png / "train")).with_format("numpy")
        seconds["png_datasets_rows"], _ = timed(lambda: np.stack(rows["image"][:]), args.repeats)
    assert all(np.array_equal(x, split.images) for x, _ in loaded.values())
    fmt = custom_format(split)
    pools = {name: TaskPool(to_model_input(x, fmt), torch.from_numpy(y)) for name, (x, y) in loaded.items()}
    assert torch.equal(pools["png"].examples, pools["array3d"].examples)
    samplers = {name: EpisodeSampler(pool, 5, 5, 15, seed=0) for name, pool in pools.items()}
    rates = {name: [] for name in pools}
    for _ in range(args.repeats + 1):  # interleaved, after a warm-up: glibc's mmap threshold settles on the first large frees
        for name, sampler in samplers.items():
            start = time.perf_counter()
            for _ in range(args.episodes):
                next(sampler)
            rates[name].append(args.episodes / (time.perf_counter() - start))
    episodes = {name: {"median": statistics.median(r[1:]), "max": max(r[1:])} for name, r in rates.items()}
    for name, s in seconds.items():
        print(f"{name:18s} load {s['median']:.3f} s" + (f", {episodes[name]['median']:.0f} episodes/s" if name in episodes else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": device_name(torch.device("cpu")), "processor": platform.processor(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "split": f"{args.images} RGB {args.size}x{args.size} images, {args.classes} classes",
        "arrow_bytes": sizes, "load_seconds": seconds, "episodes_per_second_5w5s15q": episodes,
        "episodes_per_second_rounds": rates,
        "pools_identical": True,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
