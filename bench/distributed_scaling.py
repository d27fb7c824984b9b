"""Data-parallel meta-training throughput: 1 vs 2 processes at a fixed global meta-batch.

    python bench/distributed_scaling.py --out bench/results/distributed_scaling_cpu.json
    python bench/distributed_scaling.py --device cuda --shares 1 2 4 8 --tasks protonet=8 --out /tmp/step_cost_gpu.json

CPU (default): every configuration is the real loop (`MetaTrainer`) launched by torchrun
(gloo), one thread per process, on synthetic 28x28 images (throughput does not depend on
pixel values): 1 process, 2 processes sharing each meta-batch, and, for reference, 1
process with 2 threads (the other way to spend two cores). Meta-steps/s are timed on rank
0 after warm-up, median of repeats; steps are synchronous, so rank 0's clock is the job's.
Each row also holds one process's step time on a rank's share (T/2 tasks): the compute
a rank does, against which the 2-process overhead (all_reduce, agreement, contention) shows.

`--shares`: one process only, the step time on T/W tasks for each W (what a rank of W
computes), on any device: with the all-reduce cost it estimates scaling on GPUs (docs/distributed.md).
The communication volume is exact: every meta-step all-reduces one flat buffer of every
trainable parameter's gradient (plus BatchNorm running statistics and a few flags).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaflowlib import distributed
from metaflowlib.episodes import EpisodeSampler, TaskPool
from metaflowlib.methods import MetaLearner, build_method
from metaflowlib.runtime import device_name, resolve_device
from metaflowlib.train import MetaTrainer, build_meta_optimizer

# method key -> (kind, config, ways, shots, queries, global tasks_per_step): the papers' training shapes
METHODS = {
    "protonet": ("protonet", {"hidden": 64}, 60, 5, 5, 2),  # Snell et al. 60-way; 2 tasks so each rank has one
    "maml": ("maml", {"hidden": 64, "inner_steps": 1, "inner_lr": 0.4}, 5, 1, 15, 32),  # Finn et al. meta-batch 32
}


def synthetic_pool(device: torch.device) -> TaskPool:
    classes, per_class = 200, 20
    images = torch.rand(classes * per_class, 1, 28, 28, device=device)
    return TaskPool(images, torch.arange(classes * per_class) // per_class, "train")


def build(key: str, device: torch.device) -> MetaLearner:
    kind, config, *_ = METHODS[key]
    torch.manual_seed(0)
    return build_method(kind, **config).to(device).to(memory_format=torch.channels_last)


def allreduce_bytes(method: MetaLearner) -> dict[str, int]:
    """fp32 bytes per meta-step: the gradients (the brief's volume) and the whole buffer `average_gradients` sends."""
    params, buffers = distributed.synchronized(method)
    gradients = sum(p.numel() for p in params)
    return {"meta_parameters": gradients, "gradient_bytes": 4 * gradients,
            "allreduce_bytes": 4 * (gradients + sum(b.numel() for b in buffers) + len(params) + 2)}


def steps_per_second(key: str, tasks: int, group, device: torch.device, steps: int, warmup: int) -> float:
    """The real loop for warmup + steps meta-steps; the rate over the last `steps`, timed on rank 0."""
    _, _, ways, shots, queries, _ = METHODS[key]
    method = build(key, device)
    optimizer, scheduler = build_meta_optimizer(method, "adam", 1e-3, 10**6, 1.0)
    seed = 0 if group is None else group.rank
    sampler = EpisodeSampler(synthetic_pool(device), ways, shots, queries, tasks, seed=seed)
    stamps: list[float] = []

    def stamp(metrics: dict, step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    MetaTrainer(method, sampler, optimizer, scheduler, validate=lambda m: 0.0, val_every=10**9,
                max_episodes=warmup + steps, max_seconds=None, log=stamp, log_every=1, progress="off",
                distributed=group).run()
    return steps / (stamps[-1] - stamps[warmup - 1]) if stamps else 0.0


def allreduce_ms(group, numel: int, repeats: int = 30) -> float:
    """Median time of one all_reduce of the step's buffer on this group."""
    buffer = torch.zeros(numel, device=group.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.distributed.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    """One configuration under torchrun: rates of every repeat (and the all_reduce time) to --result from rank 0."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    group = distributed.init_from_env(device)
    tasks = METHODS[args.method][5] if group is None else group.shard(METHODS[args.method][5])
    rates = [steps_per_second(args.method, tasks, group, device, args.steps, args.warmup) for _ in range(args.repeats)]
    comm = allreduce_ms(group, allreduce_bytes(build(args.method, device))["allreduce_bytes"] // 4) if group else 0.0
    if group is None or group.is_main:
        Path(args.result).write_text(json.dumps({"rates": rates, "allreduce_ms": comm}))
    distributed.shutdown()


def launch(method: str, processes: int, threads: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        worker_args = ["--worker", "--method", method, "--tasks", *args.tasks, "--threads", str(threads),
                       "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--repeats", str(args.repeats), "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(distributed.torchrun_command(Path(__file__), worker_args, processes), env=env, check=True)
        return json.loads(result.read_text())


def summary(rates: list[float], tasks: int) -> dict[str, float]:
    median = statistics.median(rates)
    return {"steps_per_second": median, "min": min(rates), "max": max(rates), "tasks_per_second": median * tasks,
            "ms_per_step": 1e3 / median}


def scaling(args: argparse.Namespace) -> list[dict]:
    """1 process vs 2 processes (one thread each), the 2-thread process, and a rank's share alone."""
    rows = []
    for key, (kind, config, ways, shots, queries, tasks) in METHODS.items():
        one, two, threads2 = launch(key, 1, 1, args), launch(key, 2, 1, args), launch(key, 1, 2, args)
        share = [steps_per_second(key, tasks // 2, None, torch.device("cpu"), args.steps, args.warmup)
                 for _ in range(args.repeats)]
        row = {"method": key, "kind": kind, "episode": f"{ways}w{shots}s{queries}q", "global_tasks_per_step": tasks,
               **allreduce_bytes(build(key, torch.device("cpu"))),
               "one_process": summary(one["rates"], tasks), "two_processes": summary(two["rates"], tasks),
               "one_process_two_threads": summary(threads2["rates"], tasks),
               "one_process_half_batch": summary(share, tasks // 2), "allreduce_ms_two_processes": two["allreduce_ms"]}
        row["speedup_two_processes"] = row["two_processes"]["steps_per_second"] / row["one_process"]["steps_per_second"]
        row["overhead_ms_two_processes"] = row["two_processes"]["ms_per_step"] - row["one_process_half_batch"]["ms_per_step"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def step_costs(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One process: the step time on T/W tasks for each W in --shares (what one rank of W computes)."""
    rows = []
    for key, (kind, _, ways, shots, queries, tasks) in METHODS.items():
        for share in (w for w in args.shares if tasks % w == 0):
            rates = [steps_per_second(key, tasks // share, None, device, args.steps, args.warmup) for _ in range(args.repeats)]
            row = {"method": key, "episode": f"{ways}w{shots}s{queries}q", "global_tasks_per_step": tasks, "ranks": share,
                   "tasks_per_rank": tasks // share, **allreduce_bytes(build(key, device)), **summary(rates, tasks // share)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shares", type=int, nargs="*", help="one process: step time on T/W tasks for each W")
    parser.add_argument("--tasks", nargs="*", default=[], metavar="KEY=N", help="global tasks_per_step, e.g. protonet=8")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for item in args.tasks:
        key, _, value = item.partition("=")
        if key not in METHODS or not value.isdigit() or int(value) < 1:
            parser.error(f"--tasks {item!r}: expected KEY=N with KEY one of {sorted(METHODS)} and N >= 1")
        METHODS[key] = (*METHODS[key][:5], int(value))
    if args.worker:
        worker(args)
        return
    if args.out is None:
        parser.error("--out is required")
    device = resolve_device(args.device)
    load_before = os.getloadavg()[0]  # other work on the machine slows the processes down
    if args.shares:
        torch.set_num_threads(args.threads)
        rows, kind = step_costs(args, device), "step_cost_per_share"
    else:
        if device.type != "cpu":
            parser.error("the process-scaling run is for CPU (gloo); on a GPU use --shares")
        torch.set_num_threads(1)
        rows, kind = scaling(args), "process_scaling"
    load = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": kind, "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_cores_visible": len(os.sched_getaffinity(0)),
        "backend": "gloo" if kind == "process_scaling" else None, "precision": "fp32", "channels_last": True,
        "load_average_1min_before_after": [load_before, load[0]],
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "results": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
