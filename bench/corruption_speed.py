"""Seconds to corrupt a batch of 28x28 images, per corruption (CPU; numpy, torch and PIL).

    python bench/corruption_speed.py --out bench/results/corruption_speed_cpu.json

The images are uniform noise: every corruption does the same work whatever the
pixels (JPEG's entropy coding aside). Each corruption is run `--repeats` times on
the same batch; median, min and max are reported. tests/test_corruptions.py checks
what the batched path computes; this only times it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from metaflowlib.data.corruptions import CORRUPTIONS, corrupt
from metaflowlib.runtime import device_name


def seconds(images: np.ndarray, name: str, severity: int, repeats: int) -> list[float]:
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        corrupt(images, name, severity, seed=seed)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)  # tta.data.images: what the TTA stage corrupts per severity
    parser.add_argument("--severity", type=int, default=5)  # the slowest for the blurs (widest kernels)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (args.images, 28, 28), dtype=np.uint8)
    corrupt(images, CORRUPTIONS[0], args.severity, seed=0)  # warm-up: imports, allocator
    results = {}
    for name in CORRUPTIONS:
        runs = seconds(images, name, args.severity, args.repeats)
        results[name] = {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}
        print(f"{name:18s} {results[name]['median']:.3f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "images": args.images, "severity": args.severity, "seconds": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
