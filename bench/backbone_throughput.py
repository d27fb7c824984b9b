"""Meta-training throughput and peak memory of ProtoNet and second-order MAML, ResNet-12 next to Conv-4, at 84x84 RGB.

    python bench/backbone_throughput.py --out bench/results/backbone_throughput_cpu.json
    python bench/backbone_throughput.py --device cuda --out /tmp/backbone_throughput_cuda.json
    python bench/backbone_throughput.py --out /tmp/b.json --quick      # tiny shapes, 1+1 steps: does every case run?

miniImageNet's standard shapes (issue 19), random tensors as images (throughput does not
depend on pixel values), fp32, NCHW:
- ProtoNet 5-way 5-shot 15-query, one task per step (and Snell et al.'s 20-way 5-shot 15-query
  training episodes); Conv-4 in its max-pool layout, hidden 64 (1600-dim features at 84x84).
- MAML, second order, 5-way 1-shot 15-query, 5 inner steps of SGD at alpha 0.01, meta-batch 4
  (Finn et al.'s miniImageNet settings); Conv-4 in its strided layout, hidden 64; zero head.
  `vectorize: auto`: the per-task loop on a CPU (which backpropagates task by task, so a meta-step
  costs meta-batch x one task, plus the outer Adam step), vmap over the meta-batch on CUDA.
- ResNet-12 64-160-320-640, average-pooled (640-dim), no dropout or DropBlock.
One meta-step = `meta_gradient` + the outer Adam step (lr 1e-3). Each configuration runs warm-up
steps, then timed steps one by one: median (and min, max) seconds per step, meta-steps/s and
images/s (support + query images of every task of the step).

On a CPU every configuration runs in a fresh subprocess (the machine's threads unless
--threads), so no peak, allocator cache or warm-up leaks into the next; on CUDA they share one
process and the allocator's peak is reset for each. Peak memory is metaflowlib.memory's
`PeakMemory(increase=True)` over warm-up and timed steps, the increase over the state just
before the first step (model, Adam, episode resident): `peak_rss_increase` on a CPU (what the
OS had to provide, allocator slack included), `cuda_max_allocated_increase` on CUDA (tensors
only); each row records its `memory_kind`.

ResNet-12 second-order MAML is slow on a CPU: it is measured at meta-batch 1 first (1 warm-up
+ 2 timed steps); meta-batch 4 only when 4 x that step is under --max-cpu-step seconds (60),
else the 1-task row stands for it (the loop's step is linear in the tasks; see `notes`).
ProtoNet ResNet-12 20-way runs on a CPU only if 4 x the 5-way peak fits half of MemAvailable.
On a CPU, few timed steps (Conv-4: 3-5 after 1-2 warm-up; ResNet-12: 2 after 1): each ResNet-12
step takes tens of seconds there, and the whole run stays under about 12 minutes.
The machine may be shared: the JSON records os.getloadavg() before and after the run.
Imports only torch, numpy (through the core) and metaflowlib's core, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from metaflowlib_bench import timing

from metaflowlib.episodes import Episode
from metaflowlib.memory import PeakMemory
from metaflowlib.methods import build_method
from metaflowlib.runtime import device_name, resolve_device, synchronize

RESNET12 = [64, 160, 320, 640]
SIDE, CHANNELS = 84, 3
INNER_STEPS, INNER_LR = 5, 0.01


def backbone(name: str, widths: list[int]) -> str | dict:
    return "conv4" if name == "conv4" else {"kind": "resnet12", "widths": widths, "drop_rate": 0.0, "pool": "avg"}


def random_episode(tasks: int, ways: int, shots: int, queries: int, side: int, device: torch.device) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).to(device)
    return Episode(
        support_x=torch.randn(tasks, ways * shots, CHANNELS, side, side, generator=g).to(device),
        support_y=labels(shots),
        query_x=torch.randn(tasks, ways * queries, CHANNELS, side, side, generator=g).to(device),
        query_y=labels(queries),
        ways=ways,
    )


def measure(method: str, backbone_name: str, ways: int, shots: int, queries: int, tasks: int, device: str,
            warmup: int, steps: int, side: int = SIDE, widths: list[int] = RESNET12) -> dict:
    """One configuration in this process: seconds per meta-step (each timed alone), peak bytes over the baseline."""
    dev = torch.device(device)
    torch.manual_seed(0)
    spec = backbone(backbone_name, widths)
    if method == "protonet":
        model = build_method("protonet", in_channels=CHANNELS, image_size=side, hidden=64, backbone=spec)
    else:
        model = build_method("maml", ways=ways, in_channels=CHANNELS, image_size=side, hidden=64, backbone=spec,
                             inner_steps=INNER_STEPS, inner_lr=INNER_LR, layout="strided", vectorize="auto")
    model = model.to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    episode = random_episode(tasks, ways, shots, queries, side, dev)

    def meta_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.meta_gradient(episode)
        optimizer.step()

    times = []
    with PeakMemory(dev, increase=True) as memory:
        for _ in range(warmup):  # allocator caches, Adam state, vmap tracing
            meta_step()
        for _ in range(steps):
            synchronize(dev)
            start = time.perf_counter()
            meta_step()
            synchronize(dev)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    images = tasks * ways * (shots + queries)
    row = {
        "method": method, "backbone": backbone_name, "episode": f"{ways}w{shots}s{queries}q", "tasks": tasks,
        "image_size": side, "widths": widths if backbone_name == "resnet12" else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_steps": warmup, "timed_steps": steps, "seconds_per_step": times,
        "seconds_per_step_median": median, "min": min(times), "max": max(times),
        "meta_steps_per_second": 1 / median, "images_per_second": images / median,
        "peak_bytes": memory.peak_bytes(), "memory_kind": memory.kind,
    }
    if method == "maml":
        row.update(inner_steps=INNER_STEPS, inner_lr=INNER_LR, second_order=True,
                   vectorize=model._mode(episode.support_x), seconds_per_task=median / tasks)
    return row


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else a large number (no guard)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


def run_fresh(config: dict, threads: int | None) -> dict:
    """`measure` in a new interpreter on a CPU, in this process on CUDA (metaflowlib_bench.timing.run_fresh)."""
    return timing.run_fresh(measure, __file__, config, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required="--worker" not in sys.argv)
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: 3 on CUDA; on a CPU 2 for ProtoNet "
                        "Conv-4 5-way, 1 for the rest)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 10 on CUDA; on a CPU 5 for ProtoNet Conv-4 "
                        "5-way, 3 for the other Conv-4 rows, 2 for ResNet-12)")
    parser.add_argument("--max-cpu-step", type=float, default=60.0,
                        help="on a CPU, ResNet-12 MAML at meta-batch 4 only if 4 x its 1-task step is under this (s)")
    parser.add_argument("--no-20-way", action="store_true", help="skip ProtoNet 20-way 5-shot 15-query")
    parser.add_argument("--quick", action="store_true", help="32x32 images, ResNet-12 widths 8-16-32-64, 1+1 steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if timing.answer_worker(args.worker, measure):
        return

    load_before = os.getloadavg()
    started = time.perf_counter()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    side, widths = (32, [8, 16, 32, 64]) if args.quick else (SIDE, RESNET12)

    def config(method, name, ways, shots, queries, tasks, warmup, steps) -> dict:
        if args.quick:
            warmup, steps = 1, 1
        return {"method": method, "backbone_name": name, "ways": ways, "shots": shots, "queries": queries,
                "tasks": tasks, "device": str(device), "side": side, "widths": widths,
                "warmup": args.warmup if args.warmup is not None else (3 if cuda else warmup),
                "steps": args.steps if args.steps is not None else (10 if cuda else steps)}

    plan = [("protonet", "conv4", 5, 5, 15, 1, 2, 5), ("protonet", "resnet12", 5, 5, 15, 1, 1, 2),
            ("maml", "conv4", 5, 1, 15, 4, 1, 3)]
    if not args.no_20_way:
        plan.append(("protonet", "conv4", 20, 5, 15, 1, 1, 3))
    rows, notes = [], []
    for entry in plan:
        rows.append(run_fresh(config(*entry), args.threads))
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_20_way:
        # 20-way is 4x the 5-way episode's images: on a CPU only if 4x the 5-way peak fits half the available memory
        five = next(r for r in rows if r["method"] == "protonet" and r["backbone"] == "resnet12")
        need, free = 4 * five["peak_bytes"], available_bytes()
        if cuda or args.quick or need < free / 2:
            rows.append(run_fresh(config("protonet", "resnet12", 20, 5, 15, 1, 1, 2), args.threads))
            print(json.dumps(rows[-1]), flush=True)
        else:
            notes.append(f"ProtoNet ResNet-12 20w5s15q not measured on this CPU: about 4 x the 5-way peak "
                         f"({need / 2**30:.1f} GiB) against {free / 2**30:.1f} GiB available (shared machine); "
                         "its step is about 4 x the 5-way one (4x the images, same network)")
    if cuda:
        rows.append(run_fresh(config("maml", "resnet12", 5, 1, 15, 4, 1, 2), args.threads))
        print(json.dumps(rows[-1]), flush=True)
    else:
        one = run_fresh(config("maml", "resnet12", 5, 1, 15, 1, 1, 2), args.threads)
        print(json.dumps(one), flush=True)
        rows.append(one)
        if 4 * one["seconds_per_step_median"] <= args.max_cpu_step:
            rows.append(run_fresh(config("maml", "resnet12", 5, 1, 15, 4, 1, 2), args.threads))
            print(json.dumps(rows[-1]), flush=True)
        else:
            notes.append(f"ResNet-12 MAML at meta-batch 4 not measured on this CPU: 4 x the 1-task step "
                         f"({4 * one['seconds_per_step_median']:.0f} s) exceeds {args.max_cpu_step:.0f} s; "
                         "the per-task loop backpropagates task by task, so a 4-task step is about 4 x seconds_per_task "
                         "(peak memory: about the 1-task row's, each task's graph is freed before the next)")

    def find(method, name, episode, tasks=None):
        return next((r for r in rows if r["method"] == method and r["backbone"] == name and r["episode"] == episode
                     and (tasks is None or r["tasks"] == tasks)), None)

    ratios = {}
    for method, episode in (("protonet", "5w5s15q"), ("protonet", "20w5s15q"), ("maml", "5w1s15q")):
        conv, res = find(method, "conv4", episode), find(method, "resnet12", episode)
        if conv and res:
            key = "seconds_per_task" if method == "maml" else "seconds_per_step_median"
            ratios[f"{method}_{episode}_resnet12_over_conv4_time"] = res[key] / conv[key]  # maml: per task
            ratios[f"{method}_{episode}_resnet12_over_conv4_peak_memory"] = res["peak_bytes"] / max(conv["peak_bytes"], 1)
    load_after = os.getloadavg()
    results = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "python": platform.python_version(), "threads": args.threads or torch.get_num_threads(),
        "process_per_configuration": not cuda, "quick": args.quick,
        "shape": {"image_size": side, "channels": CHANNELS, "resnet12_widths": widths, "conv4_hidden": 64,
                  "protonet_conv4_layout": "maxpool", "maml_conv4_layout": "strided", "precision": "fp32",
                  "memory_format": "NCHW", "maml_inner_steps": INNER_STEPS, "maml_inner_lr": INNER_LR,
                  "maml_second_order": True, "outer_optimizer": "Adam lr 1e-3", "inputs": "torch.randn"},
        "memory_measure": ", ".join(sorted({r["memory_kind"] for r in rows})),
        "loadavg_before": list(load_before), "loadavg_after": list(load_after),
        "shared_machine_note": "other processes may have shared the cores during this run (see loadavg_before/after, "
                               "1-, 5-, 15-minute load averages); absolute times compare only within this file",
        "wall_seconds": time.perf_counter() - started,
        "rows": rows, "ratios": ratios, "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
