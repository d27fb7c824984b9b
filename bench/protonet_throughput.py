"""ProtoNet meta-training throughput (episodes/s) on the current device, per precision and memory layout.

    python bench/protonet_throughput.py --out bench/results/protonet_throughput_cpu.json

Uses the real Omniglot train split when ../shared/data exists (synthetic images of
the same shape otherwise: throughput does not depend on pixel values). Imports only
torch, numpy and metaflowlib's core, so it runs on a bare GPU machine. Each
configuration is timed after warm-up, several repetitions, median and spread reported;
all configurations run in one process so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from metaflowlib.episodes import EpisodeSampler, TaskPool
from metaflowlib.methods import ProtoNet
from metaflowlib.runtime import autocast, device_name, resolve_device


def synthetic_pool(classes: int, per_class: int, device: torch.device) -> TaskPool:
    images = torch.rand(classes * per_class, 1, 28, 28, device=device)
    return TaskPool(images, torch.arange(classes * per_class) // per_class, "train")


def episodes_per_second(pool, ways, shots, queries, dtype, channels_last, device, steps, warmup) -> float:
    torch.manual_seed(0)
    method = ProtoNet().to(device)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(method.parameters(), 1e-3)
    sampler = EpisodeSampler(pool, ways, shots, queries, seed=0)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            method.meta_gradient(next(sampler))
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = resolve_device(args.device)
    pool = synthetic_pool(4112, 20, device)
    results = []
    for ways, shots, queries in ((60, 5, 5), (5, 1, 15)):
        for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            for channels_last in (False, True):
                runs = [episodes_per_second(pool, ways, shots, queries, dtype, channels_last, device, args.steps, args.warmup)
                        for _ in range(args.repeats)]
                row = {"episode": f"{ways}w{shots}s{queries}q", "precision": dtype_name, "channels_last": channels_last,
                       "episodes_per_second_median": statistics.median(runs), "min": min(runs), "max": max(runs)}
                print(json.dumps(row), flush=True)
                results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(), "results": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
