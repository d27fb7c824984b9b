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
from pathlib import Path
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
    """Peak bytes above the baseline taken on entry (see the module docstring for what is counted).

    On Linux the process's resident high-water mark is reset on entry (`/proc/self/clear_refs`), so the
    peak is the region's even when loading data peaked higher before; elsewhere the peak RSS since start.
    """

    device: torch.device
    baseline: int = 0
    high_water_reset: bool = False

    def __enter__(self) -> Self:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.high_water_reset = reset_high_water_mark()
            self.baseline = status_bytes("VmRSS") if self.high_water_reset else rss_peak_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)

    @property
    def measure(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated delta"
        return "resident high-water mark (VmHWM, reset on entry) minus RSS on entry" if self.high_water_reset \
            else "peak RSS delta (fresh process)"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) - self.baseline)
        peak = status_bytes("VmHWM") if self.high_water_reset else rss_peak_bytes()
        return int(peak - self.baseline)


def rss_peak_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_high_water_mark() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
