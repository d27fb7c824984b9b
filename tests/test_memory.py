"""Each peak-memory kind measures what its name says (metaflowlib.memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metaflowlib import memory
from metaflowlib.memory import MIB, PeakMemory

CPU = torch.device("cpu")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and its reset are Linux's")


def resident(megabytes: int) -> np.ndarray:
    """An array whose pages are all written, so they are resident (a fresh mapping: the allocator cannot reuse pages)."""
    return np.ones(megabytes * MIB // 8)


def in_a_fresh_process(check: str) -> None:
    """Run `check` (a function of this module) in a new interpreter: in a long test session glibc's dynamic mmap
    threshold lets a large array reuse heap pages that are already resident, and RSS then does not move at all."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_memory; test_memory.{check}()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@linux
def test_peak_rss_increase_is_the_blocks_own_even_after_a_higher_peak():
    in_a_fresh_process("check_peak_rss_increase")


@linux
def test_process_peak_rss_is_the_processes_peak_since_start_not_the_blocks():
    in_a_fresh_process("check_process_peak_rss")


def check_peak_rss_increase() -> None:
    before = resident(400)
    del before  # a higher peak before the block: the increase must not see it
    with PeakMemory(CPU, increase=True) as idle:
        pass
    with PeakMemory(CPU, increase=True) as block:
        array = resident(200)
    del array
    assert idle.kind == block.kind == memory.PEAK_RSS_INCREASE
    assert idle.peak_mb() < 20
    assert 190 < block.peak_mb() < 260


def check_process_peak_rss() -> None:
    memory.reset_rss_high_water()
    before = resident(300)
    del before
    rss = memory.status_bytes("VmRSS") / MIB
    with PeakMemory(CPU) as idle:
        pass
    assert idle.kind == memory.PROCESS_PEAK_RSS
    assert idle.peak_mb() > rss + 280  # the 300 MB freed before the block still count
    with PeakMemory(CPU) as block:
        array = resident(200)
    del array
    assert block.peak_mb() == pytest.approx(idle.peak_mb(), abs=20)  # under the earlier peak: no change


def test_an_increase_where_the_high_water_mark_cannot_be_reset_says_it_is_the_process_peak(monkeypatch):
    monkeypatch.setattr(memory, "reset_rss_high_water", lambda: False)
    with PeakMemory(CPU, increase=True) as block:
        pass
    assert block.kind == memory.PROCESS_PEAK_RSS and block.peak_mb() == memory.process_peak_rss_bytes() / MIB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kinds_count_the_allocators_tensors_with_and_without_those_alive_on_entry():
    device = torch.device("cuda")
    resident_tensor = torch.empty(100 * MIB, dtype=torch.uint8, device=device)
    entry = torch.cuda.memory_allocated(device) / MIB
    with PeakMemory(device) as footprint, PeakMemory(device, increase=True) as increase:
        block = torch.empty(200 * MIB, dtype=torch.uint8, device=device)
        del block
    assert footprint.kind == memory.CUDA_MAX_ALLOCATED and increase.kind == memory.CUDA_MAX_ALLOCATED_INCREASE
    assert increase.peak_mb() == pytest.approx(200, abs=2)
    assert footprint.peak_mb() == pytest.approx(entry + 200, abs=2) and entry >= 100 and resident_tensor.numel() == 100 * MIB
