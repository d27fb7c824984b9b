"""The project's ProtoNet step against a minimal Conv-4 step, per precision and layout, and what `auto` chooses (issue #16).

    PYTHONPATH=$PWD:$PWD/bench python bench/precision_choice.py --out bench/results/precision_choice_cpu.json \
        --busy 0 1 --threads 2 1 --profile

The minimal step is plain torch: Conv-4 (conv-bn-relu-maxpool x4), prototypes as class means, squared
Euclidean logits, cross-entropy, Adam. The project's is `MetaTrainer.meta_step` as the harness's
protonet_training builds it. Both draw their episodes from the same sampler (the Vinyals Omniglot train
split when ../shared/data has it, synthetic images of the same shape otherwise). The eight steps of a
shape are timed in interleaved rounds (a burst of load hits them all); median, min and max of the rounds.
`--busy N` repeats everything with N busy-looping processes of this script's own (a core taken by another
program, as when the issue measured bf16 at 0.33x fp32); `--threads` at other intra-op thread counts.
Each pass then runs `precision.choose("auto", "auto")` on an empty cache, as train@ on a new machine.
`--profile`: operator calls and torch.profiler's top operators of both steps (idle, default threads).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from metaflowlib_bench.cases import load_pools, our_trainer, pools_file
from torch import nn

from metaflowlib.episodes import EpisodeSampler, TaskPool
from metaflowlib.methods import build_method
from metaflowlib.precision import (
    Choice,
    choose,
    interleaved_rates,
    meta_step_probe,
    probe_episode,
)
from metaflowlib.runtime import device_name

SHAPES = ((5, 1, 15), (60, 5, 5))
VARIANTS = [(p, cl) for p in ("fp32", "bf16") for cl in (False, True)]


def minimal_step(pool: TaskPool, ways: int, shots: int, queries: int, bf16: bool, channels_last: bool):
    layers, channels = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]
        channels = 64
    torch.manual_seed(0)
    net = nn.Sequential(*layers, nn.Flatten())
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    sampler = EpisodeSampler(pool, ways, shots, queries, seed=0)
    labels = torch.arange(ways).repeat_interleave(queries)

    def step() -> None:
        episode = next(sampler)
        x = torch.cat([episode.support_x[0], episode.query_x[0]])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = net(x)
        z = z.float()
        prototypes = z[: ways * shots].view(ways, shots, -1).mean(1)
        logits = -torch.cdist(z[ways * shots:], prototypes).pow(2)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()

    return step


def project_step(pool: TaskPool, ways: int, shots: int, queries: int, bf16: bool, channels_last: bool):
    torch.manual_seed(0)
    method = build_method("protonet")
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    return our_trainer(method, pool, ways, shots, queries, 1, precision=torch.bfloat16 if bf16 else None).meta_step


def name(impl: str, precision: str, channels_last: bool) -> str:
    return f"{impl} {precision}/{'channels_last' if channels_last else 'nchw'}"


def time_shape(pool: TaskPool, ways: int, shots: int, queries: int, repeats: int, block_seconds: float) -> dict:
    steps = {name(impl, p, cl): make(pool, ways, shots, queries, p == "bf16", cl)
             for impl, make in (("project", project_step), ("minimal", minimal_step)) for p, cl in VARIANTS}
    runs, counts = interleaved_rates(steps, warmup=3, repeats=repeats, block_seconds=block_seconds)
    rows = {key: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v, "steps_per_round": counts[key]}
            for key, v in runs.items()}
    for p, cl in VARIANTS:
        rows[name("project", p, cl)]["project_over_minimal"] = rows[name("project", p, cl)]["median"] / rows[name("minimal", p, cl)]["median"]
    return rows


def profile(pool: TaskPool, ways: int, shots: int, queries: int, rows: int = 12) -> dict:
    """Per step: operator calls and the top operators by self CPU time, of both steps in bf16/channels_last and fp32/nchw."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for impl, make in (("project", project_step), ("minimal", minimal_step)):
        for p, cl in (("fp32", False), ("bf16", True)):
            step = make(pool, ways, shots, queries, p == "bf16", cl)
            for _ in range(3):
                step()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            out[name(impl, p, cl)] = {
                "operator_calls_per_step": sum(e.count for e in averages) / 3,
                "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in averages) / 3e3,
                "top": [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 3e3, "calls_per_step": e.count / 3}
                        for e in averages[:rows]],
            }
    return out


def auto_choice(pool: TaskPool, ways: int, shots: int, queries: int) -> dict:
    """What train@ would choose on this machine with an empty cache, and how long choosing took."""
    method = build_method("protonet")
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        choice: Choice = choose("auto", "auto", torch.device("cpu"),
                                meta_step_probe(method, probe_episode(method, pool, ways, shots, queries)), cache=Path(cache) / "p.json")
        return {**choice.to_json(), "seconds_to_choose": time.perf_counter() - start}


def spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-seconds", type=float, default=0.5, help="timed seconds per step per round (about)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0], help="busy-looping processes started during each pass")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="intra-op threads of each pass (default torch's: one per core)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--data", help="data root holding omniglot/ (default: ../shared/data)")
    args = parser.parse_args()
    pools, data = load_pools(pools_file(args.data), torch.device("cpu"))
    pool = pools["train"]
    passes, default_threads = [], torch.get_num_threads()
    for threads, busy in [(t, b) for t in args.threads for b in args.busy]:
        torch.set_num_threads(threads)
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
        for s in spinners:
            s.start()
        try:
            for ways, shots, queries in SHAPES:
                load_before = os.getloadavg()[0]
                rates = time_shape(pool, ways, shots, queries, args.repeats, args.block_seconds)
                chosen = auto_choice(pool, ways, shots, queries)
                row = {"threads": threads, "busy_processes": busy, "episode": f"{ways}w{shots}s{queries}q", "load_average_1min": [load_before, os.getloadavg()[0]],
                       "episodes_per_second": rates, "auto": chosen}
                if args.profile and busy == 0 and threads == default_threads:
                    row["profile"] = profile(pool, ways, shots, queries)
                print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
                passes.append(row)
        finally:
            for s in spinners:
                s.terminate()
                s.join()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": device_name(torch.device("cpu")), "cpu_flags_bf16": sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                                                                             if f in ("avx512_bf16", "amx_bf16")}),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "default_threads": default_threads,
        "cores": os.cpu_count(), "python": platform.python_version(), "data": data, "command": " ".join(sys.argv), "passes": passes,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
