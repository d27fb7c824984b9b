"""Device, precision and seeding: decided once, used by every stage (peak memory: metaflowlib.memory; the measured
choice of precision and layout for train.precision / train.channels_last `auto`: metaflowlib.precision)."""

from __future__ import annotations

import contextlib
import random
import sys
from typing import ContextManager

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU (set device: auto or cpu)")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Whether the device has bf16 units: a GPU that supports bf16, a CPU with AVX512-BF16/AMX (whether bf16 then pays
    off on a CPU is another question, which metaflowlib.precision answers by timing)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if sys.platform != "linux":
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32, by the flag rule: `auto` is bf16 wherever `bf16_supported` (the TTA
    stages' rule; train@, pretrain@ and evaluate@ choose by measuring, metaflowlib.precision.choose)."""
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a time or memory taken next includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
