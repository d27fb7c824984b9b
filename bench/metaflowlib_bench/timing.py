"""How the harness times a step: warm-up, repetitions, median and spread.

Device work is asynchronous, so every timed region ends with a synchronize.
Peak memory is metaflowlib.memory's (`PeakMemory(device, increase=True)`): the
increase over the state just before the first timed step, with its kind.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from metaflowlib.runtime import synchronize


def spread(values: list[float]) -> dict[str, float | list[float]]:
    """Median, min, max and every run: the rows of every benchmark table."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def rate(
    step: Callable[[], object], items_per_step: int, device: torch.device, *, warmup: int, steps: int, repeats: int
) -> dict[str, float | list[float]]:
    """Items (episodes, tasks) per second of `step`, after `warmup` untimed calls, over `repeats` timed blocks."""
    for _ in range(warmup):
        step()
    synchronize(device)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        runs.append(items_per_step * steps / (time.perf_counter() - start))
    return spread(runs)


def seconds_per_call(fn: Callable[[], object], device: torch.device, *, warmup: int, calls: int, repeats: int) -> dict:
    """Median seconds of one call of `fn` (latency), over `repeats` blocks of `calls` calls."""
    per_second = rate(fn, 1, device, warmup=warmup, steps=calls, repeats=repeats)
    runs = [1.0 / r for r in per_second["runs"]]
    return spread(runs)


def run_fresh(measure: Callable[..., dict], script: str, config: dict, threads: int | None) -> dict:
    """`measure(**config)` in a new interpreter (`script --worker CONFIG [--threads N]`, whose last stdout line is
    the result as JSON), so a CPU peak RSS is the configuration's own; on CUDA in this process, where the
    allocator's peak is reset per configuration and a fresh process would only add start-up time."""
    import json
    import subprocess
    import sys

    if config["device"].startswith("cuda"):
        result = measure(**config)
        torch.cuda.empty_cache()
        return result
    command = [sys.executable, script, "--worker", json.dumps(config)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"configuration {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def answer_worker(worker: str | None, measure: Callable[..., dict]) -> bool:
    """The other side of `run_fresh`: with `--worker CONFIG`, print `measure(**CONFIG)` as JSON and return True."""
    import json

    if worker is None:
        return False
    print(json.dumps(measure(**json.loads(worker))))
    return True
