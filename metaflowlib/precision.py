"""Precision and memory layout of a training step, chosen by timing it on this machine (issue #16).

A CPU flag says bf16 units exist, not that bf16 pays off: on a 2-core Xeon with AMX-BF16 the ProtoNet step
ran bf16 + channels_last at 2.0-2.4x its fp32 speed when idle, and below fp32 + channels_last (0.67x; in a
harness run of the issue 0.33x fp32) while another process held a core (bench/results/precision_choice_cpu.json,
bench/PROFILE.md). So on a CPU, `auto` times the step itself for every candidate in {fp32, bf16 where the CPU
has bf16 units} x {NCHW, channels_last}, interleaved, and keeps the plainest candidate (fp32 before bf16, NCHW
before channels_last) whose rate is within `MARGIN` of the fastest: noise never buys the slower one. The
choice is cached per machine in `$METAFLOWLIB_CACHE_DIR/precision.json` (default ~/.cache/metaflowlib/), keyed
by the CPU, torch version, thread count, the step (method kind, config, episode shape) and the candidates.
On CUDA the rule is fixed: bf16 where supported, channels_last. Explicit values are obeyed without measuring.

Imports torch, numpy and the standard library only: the core runs on a bare GPU machine.

    probe = meta_step_probe(method, probe_episode(method, pool, ways=60, shots=5, queries=5))
    choice = choose("auto", "auto", device, probe)   # Choice(precision='bf16', channels_last=True, source='measured', ...)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from metaflowlib.episodes import Episode, TaskPool, fixed_episodes
from metaflowlib.runtime import autocast, bf16_supported, device_name

if TYPE_CHECKING:
    from metaflowlib.methods import MetaLearner

MARGIN = 0.10  # a less plain candidate wins only when >= 10% faster than every plainer one (noise on a shared CPU)
PRECISIONS = ("auto", "fp32", "bf16")

Candidate = tuple[str, bool]  # (precision, channels_last)
Step = Callable[[], object]


def label(candidate: Candidate) -> str:
    return f"{candidate[0]}/{'channels_last' if candidate[1] else 'nchw'}"


@dataclass(frozen=True)
class Choice:
    """What a run computes in: `precision` "fp32" or "bf16" (autocast), `channels_last`, and how it was decided.

    source: "explicit" (params said so), "cuda" (the fixed GPU rule), "single" (one candidate: e.g. a method
    that is always fp32 and has no convolution), "measured", "cached", or "resumed" / "recorded" (kept from
    an interrupted run's checkpoint / from the training run). rates: steps/s per candidate label, when timed.
    """

    precision: str
    channels_last: bool
    source: str
    rates: dict[str, float] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32 (as `runtime.autocast` takes it)."""
        return torch.bfloat16 if self.precision == "bf16" else None

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "channels_last": self.channels_last, "source": self.source, "rates": dict(self.rates)}

    @classmethod
    def from_json(cls, record: dict[str, Any], source: str | None = None) -> Choice:
        if record.get("precision") not in ("fp32", "bf16") or not isinstance(record.get("channels_last"), bool):
            raise ValueError(f"not a precision choice: {record!r}")
        rates = {str(k): float(v) for k, v in (record.get("rates") or {}).items()}
        return cls(record["precision"], record["channels_last"], source or str(record.get("source", "recorded")), rates)

    def tags(self) -> dict[str, str]:
        """For the MLflow run (tags: a resumed run sets them again without a conflict)."""
        return {"precision": self.precision, "channels_last": str(self.channels_last).lower(), "precision_source": self.source,
                **({"precision_rates": self.rates_text()} if self.rates else {})}

    def rates_text(self) -> str:
        """Plainest first, whatever order a JSON writer left them in."""
        order = sorted(self.rates, key=lambda name: (not name.startswith("fp32"), name.endswith("channels_last")))
        return ", ".join(f"{name} {self.rates[name]:.3g}" for name in order)

    def describe(self) -> str:
        """One line: what was chosen, how, and the rates it was chosen from."""
        rates = f": {self.rates_text()} steps/s" if self.rates else ""
        return f"{label((self.precision, self.channels_last))} ({self.source}{rates})"


@dataclass(frozen=True)
class Probe:
    """A step to time: `make(candidate)` builds a fresh copy of the step in that precision and layout (leaving
    the run's own model, optimizer and random state alone); `key` names it for the cache; `bf16` False when the
    step always runs fp32 (a method that is not autocast-safe); `layouts` False when it runs no convolution."""

    make: Callable[[Candidate], Step]
    key: dict[str, Any]
    bf16: bool = True
    layouts: bool = True


def choose(precision: str, channels_last: bool | str, device: torch.device, probe: Probe | None = None, *,
           timer: Callable[[Probe, list[Candidate]], dict[str, float]] | None = None, bf16_units: bool | None = None,
           cache: Path | None = None, margin: float = MARGIN) -> Choice:
    """The precision and layout to train in.

    Args:
        precision: "auto", "fp32" or "bf16" (params `train.precision`).
        channels_last: True, False or "auto" (params `train.channels_last`).
        probe: the step to time; needed only when a CPU choice is measured.
        timer: (probe, candidates) -> steps/s per candidate label; default `time_candidates`.
        bf16_units: whether the CPU has bf16 units; default from /proc/cpuinfo (`runtime.bf16_supported`).
        cache: the cache file; default `cache_path()`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if channels_last not in (True, False, "auto"):
        raise ValueError(f"channels_last must be true, false or 'auto', got {channels_last!r}")
    if precision != "auto" and channels_last != "auto":
        return Choice(precision, channels_last, "explicit")
    if device.type != "cpu":  # GPUs: bf16 where supported and channels_last, not worth a measurement
        p = precision if precision != "auto" else ("bf16" if bf16_supported(device) else "fp32")
        return Choice(p, True if channels_last == "auto" else channels_last, "cuda" if device.type == "cuda" else "rule")
    if probe is None:
        raise ValueError("choosing precision or layout on a CPU times a step: pass a probe")
    units = bf16_supported(device) if bf16_units is None else bf16_units
    precisions = [precision] if precision != "auto" else (["fp32", "bf16"] if units and probe.bf16 else ["fp32"])
    layouts = [channels_last] if channels_last != "auto" else ([False, True] if probe.layouts else [False])
    candidates = [(p, layout) for p in precisions for layout in layouts]  # plainest first
    if len(candidates) == 1:
        return Choice(*candidates[0], "single")
    key = {"cpu": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "candidates": [label(c) for c in candidates], "step": probe.key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache or cache_path()
    entries = read_cache(path)
    if digest in entries:
        try:
            return Choice.from_json(entries[digest], "cached")
        except (ValueError, TypeError, AttributeError):
            pass  # a damaged entry: measure again, and overwrite it
    with _rng_untouched():
        rates = (timer or time_candidates)(probe, candidates)
    chosen = pick(rates, candidates, margin)
    choice = Choice(*chosen, "measured", {label(c): float(rates[label(c)]) for c in candidates})
    entries[digest] = {**choice.to_json(), "source": "measured", "key": key, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_cache(path, entries)
    return choice


def pick(rates: dict[str, float], candidates: list[Candidate], margin: float = MARGIN) -> Candidate:
    """The first (plainest) candidate within `margin` of the fastest: bf16 or channels_last only when clearly faster."""
    fastest = max(rates[label(c)] for c in candidates)
    return next(c for c in candidates if rates[label(c)] * (1 + margin) >= fastest)


def time_candidates(probe: Probe, candidates: list[Candidate], *, warmup: int = 2, repeats: int = 3,
                    block_seconds: float = 0.1) -> dict[str, float]:
    """Steps/s of each candidate: the median of `interleaved_rates`' rounds."""
    rates, _ = interleaved_rates({label(c): probe.make(c) for c in candidates}, warmup=warmup, repeats=repeats,
                                 block_seconds=block_seconds)
    return {name: statistics.median(values) for name, values in rates.items()}


def interleaved_rates(steps: dict[str, Step], *, warmup: int = 2, repeats: int = 3,
                      block_seconds: float = 0.1) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Steps/s of each step per round, and the steps per round: `warmup` steps each (the last one timed, to size the
    rounds), then `repeats` rounds that time each step in turn (interleaved, so a burst of load hits them all) for at
    least `block_seconds`."""
    per_step = {}
    for name, step in steps.items():
        for _ in range(warmup - 1):
            step()
        start = time.perf_counter()
        step()
        per_step[name] = time.perf_counter() - start
    counts = {name: max(1, math.ceil(block_seconds / max(seconds, 1e-6))) for name, seconds in per_step.items()}
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                step()
            runs[name].append(counts[name] / (time.perf_counter() - start))
    return runs, counts


# ---------------------------------------------------------------- the steps timed


def probe_episode(method: MetaLearner, pool: TaskPool, ways: int, shots: int, queries: int, tasks: int = 1,
                  seed: int = 0) -> Episode:
    """A task batch of the training shape from `pool` (its own generator: the run's task stream is untouched);
    embedded by the method's feature map when training samples embedded episodes (`frozen_features`)."""
    episode = pool.gather(fixed_episodes(pool, tasks, ways, shots, queries, seed))
    if not method.frozen_features or episode.embedded:
        return episode
    was_training = method.training
    method.eval()
    with torch.no_grad():
        support, query = (method.features(x.flatten(0, 1)).unflatten(0, x.shape[:2]) for x in (episode.support_x, episode.query_x))
    method.train(was_training)
    return Episode(support, episode.support_y, query, episode.query_y, episode.ways, embedded=True)


def meta_step_probe(method: MetaLearner, episode: Episode, lr: float = 1e-3) -> Probe:
    """Meta-training's step on a copy of `method`: the meta-gradient under autocast, then an Adam update
    (MetaTrainer.meta_step without the divergence guard)."""

    def make(candidate: Candidate) -> Step:
        model = copy.deepcopy(method).train()
        if candidate[1]:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        dtype = model.precision(torch.bfloat16 if candidate[0] == "bf16" else None)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(episode.support_x.device, dtype):
                model.meta_gradient(episode)
            optimizer.step()

        return step

    key = {"kind": "meta_step", "method": method.kind, "config": method.config(), "support": list(episode.support_x.shape),
           "query": list(episode.query_x.shape), "embedded": episode.embedded}
    return Probe(make, key, bf16=method.precision(torch.bfloat16) is not None,
                 layouts=not episode.embedded and has_convolutions(method))


def has_convolutions(module: torch.nn.Module) -> bool:
    """Whether a memory layout can matter: some 4-D (convolution) weight."""
    return any(p.dim() == 4 for p in module.parameters())


# ---------------------------------------------------------------- the cache


def cache_path() -> Path:
    """$METAFLOWLIB_CACHE_DIR/precision.json, by default ~/.cache/metaflowlib/precision.json."""
    return Path(os.environ.get("METAFLOWLIB_CACHE_DIR") or Path.home() / ".cache" / "metaflowlib") / "precision.json"


def read_cache(path: Path) -> dict[str, Any]:
    """The cached choices by key digest; {} when the file is missing or not a JSON object (a damaged cache is
    measured again and rewritten, never an error)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Atomically (a temp file renamed over it): a reader sees the old file or the new one, never half of one.
    A cache that cannot be written costs a measurement next time, not the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(entries, out, indent=1)
        os.replace(tmp, path)
    except OSError as error:
        warnings.warn(f"precision cache {path} not written ({error}); the next run measures again", stacklevel=2)


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Timing runs real steps: torch's, numpy's and Python's global random states are put back afterwards."""
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def recorded(record: dict[str, Any] | None, precision: str, channels_last: bool | str, device: torch.device) -> Choice:
    """The choice a training run recorded (train.json "precision"), for a stage that follows it (evaluate@);
    without a record (a run from before the choice was recorded) explicit params are obeyed, and `auto` is
    fp32 on a CPU and the fixed rule on a GPU: never slower than fp32, without a step to time."""
    if record:
        return Choice.from_json(record, "recorded")
    if device.type == "cpu":
        return Choice("fp32" if precision == "auto" else precision, False if channels_last == "auto" else bool(channels_last),
                      "explicit" if precision != "auto" and channels_last != "auto" else "default")
    return choose(precision, channels_last, device)


__all__ = ["MARGIN", "Candidate", "Choice", "Probe", "cache_path", "choose", "meta_step_probe", "pick", "probe_episode",
                          "read_cache", "recorded", "time_candidates", "write_cache"]
