"""Peak memory, each number named by what it measures: recorded beside it as `memory_kind`.

Kinds (values in MiB):
- `process_peak_rss`: the process's peak resident set size (ru_maxrss) since it started, or since
  the last reset of its high-water mark (Linux resets both at once): the footprint, data included.
- `peak_rss_increase`: the high-water mark (VmHWM), reset on entering a block, minus the RSS on
  entry: what the block itself took from the OS, allocator slack included (Linux >= 4.0).
- `cuda_max_allocated`: torch.cuda.max_memory_allocated over a block, tensors alive on entry included.
- `cuda_max_allocated_increase`: the same minus the allocated bytes on entry: the block's own tensors.

Numbers of different kinds do not compare; a table shows the kind in its header.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import torch

from metaflowlib.runtime import synchronize

PROCESS_PEAK_RSS = "process_peak_rss"
PEAK_RSS_INCREASE = "peak_rss_increase"
CUDA_MAX_ALLOCATED = "cuda_max_allocated"
CUDA_MAX_ALLOCATED_INCREASE = "cuda_max_allocated_increase"
MIB = 2**20


def process_peak_rss_bytes() -> int:
    """ru_maxrss of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def status_bytes(field_name: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field_name}")


def reset_rss_high_water() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """The peak memory of a `with` block on `device`, and its `kind` (set on entry), taken as the block exits.

    By default the footprint (`cuda_max_allocated` on a GPU, `process_peak_rss` on a CPU: what a
    training stage reports); with `increase`, what the block added over the state on entry
    (`cuda_max_allocated_increase`, `peak_rss_increase`; `process_peak_rss` where the high-water
    mark cannot be reset): what an adaptation strategy or a benchmarked step costs.
    """

    device: torch.device
    increase: bool = False
    kind: str = field(init=False, default="")
    baseline: int = field(init=False, default=0)  # bytes in use on entry, for the increase kinds
    peak: int | None = field(init=False, default=None)  # bytes, as the block exited

    def __enter__(self) -> Self:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = CUDA_MAX_ALLOCATED_INCREASE if self.increase else CUDA_MAX_ALLOCATED
            self.baseline = torch.cuda.memory_allocated(self.device) if self.increase else 0
        elif self.increase and reset_rss_high_water():
            self.kind, self.baseline = PEAK_RSS_INCREASE, status_bytes("VmRSS")
        else:
            self.kind = PROCESS_PEAK_RSS
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        if self.kind in (CUDA_MAX_ALLOCATED, CUDA_MAX_ALLOCATED_INCREASE):
            high = torch.cuda.max_memory_allocated(self.device)
        else:
            high = status_bytes("VmHWM") if self.kind == PEAK_RSS_INCREASE else process_peak_rss_bytes()
        self.peak = high - self.baseline

    def peak_bytes(self) -> int:
        if self.peak is None:
            raise RuntimeError("PeakMemory is read after its block has exited")
        return self.peak

    def peak_mb(self) -> float:
        return self.peak_bytes() / MIB
