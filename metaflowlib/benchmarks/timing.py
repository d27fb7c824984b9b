"""How the harness times and weighs a step: warm-up, repetitions, median and spread, peak memory.

Device work is asynchronous, so every timed region ends with a synchronize.
Peak memory is the increase over the state just before the first timed step:
the CUDA allocator's peak on a GPU (tensors only), the process's peak RSS on
a CPU (meaningful only in a fresh process, which is why the harness isolates
CPU cases in subprocesses).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@dataclass
class PeakMemory:
    """Peak bytes above the baseline taken on entry (see the module docstring for what is counted)."""

    device: torch.device
    baseline: int = 0

    def __enter__(self) -> Self:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = rss_peak_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)

    @property
    def measure(self) -> str:
        return "torch.cuda.max_memory_allocated delta" if self.device.type == "cuda" else "peak RSS delta (fresh process)"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) - self.baseline)
        return int(rss_peak_bytes() - self.baseline)


def rss_peak_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
