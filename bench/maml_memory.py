"""Peak memory and time per meta-step of MAML, FOMAML, Reptile and iMAML against the number of inner steps.

    python bench/maml_memory.py --device cpu --out /tmp/maml_bench
    python bench/maml_memory.py --device cuda --out /tmp/maml_bench     # meta-batch 32

Conv-4 (64 channels), 5-way 1-shot 15-query, random 28x28 images (memory and
time do not depend on pixel values). One meta-step = `meta_gradient` + the outer
optimizer step. On a CPU every configuration runs in a fresh subprocess, so no peak,
allocator cache or warm-up leaks from one into the next; on CUDA they share
one process and the allocator's peak is reset for each. Peak memory is the
increase over the state just before the first meta-step (model, optimizer,
episode already resident), metaflowlib.memory's `PeakMemory(increase=True)`:
- CUDA: cuda_max_allocated_increase, the allocator's peak minus what it held on entry (tensors only).
- CPU:  peak_rss_increase, the resident high-water mark (reset on entry) minus the RSS on entry:
        what the OS had to provide, allocator slack included.
Each run records its kind (`memory_kind`); results.json's `memory_measure` names them.
Writes results.json (device, torch version, every number) and memory.png.

    python bench/maml_memory.py --log-mlflow bench/results/maml_memory_cpu

logs a results folder (the table, the plot, one metric per method and inner-step
count) as a run of the MLflow experiment `benchmarks` ($MLFLOW_TRACKING_URI, else
the project's sqlite:///mlflow.db); it measures nothing, so committed results from a
GPU machine without MLflow can be logged here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from metaflowlib_bench import timing

from metaflowlib.episodes import Episode
from metaflowlib.memory import PeakMemory
from metaflowlib.methods import build_method
from metaflowlib.runtime import device_name, synchronize

METHOD_KINDS = ("maml", "fomaml", "reptile", "imaml")
INNER_STEPS = (1, 2, 5, 10, 20)
WAYS, SHOTS, QUERIES, SIDE = 5, 1, 15, 28


def random_episode(tasks: int, device: torch.device, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(WAYS).repeat_interleave(k).expand(tasks, -1).to(device)
    return Episode(
        support_x=torch.randn(tasks, WAYS * SHOTS, 1, SIDE, SIDE, generator=g).to(device),
        support_y=labels(SHOTS),
        query_x=torch.randn(tasks, WAYS * QUERIES, 1, SIDE, SIDE, generator=g).to(device),
        query_y=labels(QUERIES),
        ways=WAYS,
    )


def measure(kind: str, inner_steps: int, vectorize: str, tasks: int, device: str, repeats: int,
            chunk_size: int | None = None) -> dict:
    """One configuration, in this (fresh) process: peak bytes over the baseline, seconds per meta-step."""
    dev = torch.device(device)
    torch.manual_seed(0)
    method = build_method(kind, ways=WAYS, image_size=SIDE, inner_steps=inner_steps, vectorize=vectorize,
                          chunk_size=chunk_size).to(dev)
    # Reptile's formula needs plain SGD with lr = beta; the others take any optimizer (Adam, as in the papers)
    params = method.parameters()
    optimizer = torch.optim.SGD(params, lr=1.0) if kind == "reptile" else torch.optim.Adam(params)
    episode = random_episode(tasks, dev)

    def meta_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        method.meta_gradient(episode)
        optimizer.step()

    with PeakMemory(dev, increase=True) as memory:
        meta_step()  # warm-up: allocator caches, Adam state, vmap tracing
        synchronize(dev)
        start = time.perf_counter()
        for _ in range(repeats):
            meta_step()
        synchronize(dev)
        seconds = (time.perf_counter() - start) / repeats
    return {
        "method": kind, "inner_steps": inner_steps, "vectorize": vectorize, "chunk_size": chunk_size,
        "peak_bytes": memory.peak_bytes(), "memory_kind": memory.kind, "seconds_per_step": seconds,
    }


def run_fresh(config: dict, threads: int | None) -> dict:
    """`measure` in a new interpreter on a CPU, in this process on CUDA (metaflowlib_bench.timing.run_fresh)."""
    return timing.run_fresh(measure, __file__, config, threads)


def plot(runs: list[dict], path: Path, title: str) -> None:
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in METHOD_KINDS:
        rows = sorted((r for r in runs if r["method"] == kind), key=lambda r: r["inner_steps"])
        steps = [r["inner_steps"] for r in rows]
        ax_mem.plot(steps, [r["peak_bytes"] / 2**20 for r in rows], marker="o", label=kind)
        ax_time.plot(steps, [r["seconds_per_step"] * 1e3 for r in rows], marker="o", label=kind)
    for ax, label in ((ax_mem, "peak memory per meta-step (MiB)"), (ax_time, "time per meta-step (ms)")):
        ax.set_xscale("log")
        ax.set_xticks(INNER_STEPS, [str(s) for s in INNER_STEPS])
        ax.set_xlabel("inner steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def log_mlflow(folder: Path) -> None:
    """One MLflow run per results folder: table and plot as artifacts, peak MiB and ms per meta-step as metrics."""
    import os

    import mlflow

    results = json.loads((folder / "results.json").read_text())
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=f"maml_memory-{results['device_type']}",
                          tags={"benchmark": "maml_memory", "device": results["device"], "torch": results["torch"]}) as run:
        mlflow.log_params({"tasks": results["shape"]["tasks"], "threads": results["threads"], "memory_measure": results["memory_measure"]})
        for r in results["runs"]:
            mlflow.log_metric(f"peak_mib_{r['method']}", r["peak_bytes"] / 2**20, step=r["inner_steps"])
            mlflow.log_metric(f"ms_per_meta_step_{r['method']}", 1e3 * r["seconds_per_step"], step=r["inner_steps"])
        ratio = results["vmap_vs_loop"]
        mlflow.log_metrics({"time_ratio_vmap_over_loop": ratio["time_ratio_vmap_over_loop"],
                            "memory_ratio_vmap_over_loop": ratio["memory_ratio_vmap_over_loop"]})
        mlflow.log_artifacts(str(folder), artifact_path="maml_memory")
    print(f"logged {folder} as MLflow run {run.info.run_id} (experiment 'benchmarks')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required="--worker" not in sys.argv and "--log-mlflow" not in sys.argv)
    parser.add_argument("--log-mlflow", type=Path, metavar="FOLDER", help="log a results folder to MLflow, measure nothing")
    parser.add_argument("--tasks", type=int, help="meta-batch size (default: 32 on CUDA, 4 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed meta-steps after one warm-up step")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=list(INNER_STEPS))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_KINDS), choices=METHOD_KINDS)
    parser.add_argument("--ratio-steps", type=int, default=5, help="inner steps of the MAML vmap-vs-loop comparison")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if timing.answer_worker(args.worker, measure):
        return
    if args.log_mlflow:
        log_mlflow(args.log_mlflow)
        return

    tasks = args.tasks or (32 if args.device.startswith("cuda") else 4)
    base = {"tasks": tasks, "device": args.device, "repeats": args.repeats}
    runs = []
    for kind in args.methods:
        for steps in args.inner_steps:
            runs.append(run_fresh({**base, "kind": kind, "inner_steps": steps, "vectorize": "auto"}, args.threads))
            print(json.dumps(runs[-1]), flush=True)
    vmap, loop = (
        run_fresh({**base, "kind": "maml", "inner_steps": args.ratio_steps, "vectorize": v}, args.threads)
        for v in ("vmap", "loop")
    )
    chunked = run_fresh({**base, "kind": "maml", "inner_steps": args.ratio_steps, "vectorize": "vmap",
                         "chunk_size": max(1, tasks // 4)}, args.threads)
    ratio = {
        "method": "maml", "inner_steps": args.ratio_steps, "vmap": vmap, "loop": loop, "chunked_vmap": chunked,
        "chunked_memory_ratio_over_vmap": chunked["peak_bytes"] / max(vmap["peak_bytes"], 1),
        "chunked_time_ratio_over_vmap": chunked["seconds_per_step"] / vmap["seconds_per_step"],
        "time_ratio_vmap_over_loop": vmap["seconds_per_step"] / loop["seconds_per_step"],
        "memory_ratio_vmap_over_loop": vmap["peak_bytes"] / max(loop["peak_bytes"], 1),
    }
    print(json.dumps(ratio), flush=True)
    name = device_name(torch.device(args.device))
    results = {
        "device": name, "device_type": torch.device(args.device).type, "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "memory_measure": ", ".join(sorted({run["memory_kind"] for run in runs})),
        "shape": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "image_size": SIDE, "hidden": 64, "tasks": tasks},
        "repeats": args.repeats, "runs": runs, "vmap_vs_loop": ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(runs, args.out / "memory.png", f"Conv-4 5-way 1-shot, {tasks} tasks per meta-step, {name}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'memory.png'}")


if __name__ == "__main__":
    main()
