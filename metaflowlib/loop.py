"""The one training loop: budget, validation with the best state kept, checkpoints, signals, progress, logging.

A training is a step function (one update; returns its metrics, as floats or as 0-dim tensors that
may stay on the device until the loop logs them) and the objects it changes,
registered by name: anything with `state_dict()` / `load_state_dict()` (modules, optimizers,
schedulers, a `Minibatches` stream, an optimizee trajectory). `Loop` owns the rest, once for
every training in the project: the budget (steps and/or seconds of step time), validation every
`val_every` steps and when the budget is spent, atomic checkpoints (safetensors + JSON, never a
pickle) every `checkpoint_every` steps and on SIGINT/SIGTERM, resuming from one bitwise (the
registered states, torch/numpy/Python RNGs, counters, best state, history), progress, the
`log(metrics, step)` callback, and peak memory. It imports torch, numpy and the core only: metrics
leave through `log`, so a loop runs on a bare GPU machine. A step need not wait for the device: the
loop reads tensors back only at the steps it logs, reports, validates or checkpoints, and a `guard`
(e.g. an on-device "all finite so far" flag) is checked just before those reads and writes.

    loop = Loop(step, max_steps=1000, state={"model": model, "optimizer": optimizer},
                validate=validate, val_every=100, keep=model, checkpoint_dir=Path("ckpt"))
    result = loop.run()  # model holds the best-validating state
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from metaflowlib.errors import DataError, Interrupted
from metaflowlib.io import load_checkpoint, save_checkpoint
from metaflowlib.memory import PeakMemory

LogFn = Callable[[dict[str, float], int], None]
Metrics = Mapping[str, "float | Tensor"]
LAYOUT = 1  # of the checkpoint; one from the per-training loops before this module is refused, not misread
PROGRESS = ("bar", "log", "off")


class Stateful(Protocol):
    """What a loop checkpoints: torch modules, optimizers and schedulers, or a small object of one's own whose
    state is a nest of dicts, lists, scalars and tensors."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


class Replicas(Protocol):
    """What the loop asks of a data-parallel group; `metaflowlib.distributed.Distributed` implements it
    (not imported here: code that only reuses the loop need not depend on it)."""

    rank: int
    world_size: int
    is_main: bool

    def average_gradients(self, module: torch.nn.Module, scalars: Sequence[float]) -> list[float]: ...
    def any_signal(self, signal_number: int | None) -> int | None: ...
    def slowest(self, seconds: float) -> float: ...
    def from_main(self, compute: Callable[[], float]) -> float: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def broadcast_module(self, module: torch.nn.Module) -> None: ...
    def gather(self, tensor: Tensor) -> Tensor: ...


@dataclass
class LoopResult:
    steps: int
    seconds: float  # step time summed over resumes: validation, logging and checkpoints excluded
    best_score: float  # -inf when nothing was validated
    best_step: int
    peak_memory_mb: float
    memory_kind: str
    history: list[dict[str, float]] = field(default_factory=list)


class Loop:
    """Run `train_step` until the budget is spent.

    Args:
        train_step: one update; returns its metrics, floats or 0-dim tensors. Tensors may stay on the device:
            the loop turns them into floats (in one transfer) only at the steps it logs, reports or validates,
            so a step need not sync a GPU. It may read `loop.step` (steps done before it).
        max_steps / max_seconds: the budget, whichever comes first (seconds of step time, summed over resumes).
        state: everything a resumed run needs besides the RNGs, by name.
        validate: the score of the current state, higher is better, logged as `score` every `val_every`
            steps (None: only when the budget is spent); `keep`'s state at the best score is loaded
            into it at the end. Without `validate` the loop ends with the last state.
        on_validation: more metrics for each validation, computed after the best state is kept.
        checkpoint_dir: resume from / save to here every `checkpoint_every` steps, when the budget is spent,
            and on SIGINT/SIGTERM, which stop the loop between steps (`Interrupted`).
        stop_when: asked between steps; True stops the loop as a signal does (checkpoint, `Interrupted`, exit
            code 0): a time allowance that ends a segment of a longer run, resumed later (bench/paper_run.py).
            One process only: ranks could answer differently.
        log / log_every: log(metrics, step) every `log_every` steps and at each validation; the same rows
            (plus `unit: step`) make the history.
        progress: "bar" (tqdm on stderr), "log" (a line at each validation and every `report_every` steps,
            showing the metrics named in `show`), or "off". `name` prefixes the lines; `unit` names a step.
        guard: raises (e.g. DivergenceError) if the steps since its last call left a state that must not be
            logged, validated, kept or saved; called, at most once per step, before the loop reads the metrics
            back, before each validation and checkpoint, and when the budget is spent (`checked`: the step of
            its last passing call). A step that folds a check into a device flag is checked at that cadence
            instead of syncing every step; a device wait in the guard counts as step time.
        distributed: this rank's place in a data-parallel group, or None. Step times are the slowest
            rank's and a signal to any rank stops all, so every rank stops at the same step; only rank 0
            logs, prints and writes checkpoints. Every rank calls `validate` (which must return the same
            score everywhere, e.g. through `Replicas.from_main`) and every registered `state_dict()`
            (which may be a collective); rank 0 alone reads a checkpoint and sends it to the others.

    Refused: no budget; `validate` without `keep` or the other way round; `on_validation` without `validate`;
    a cadence below 1; an unknown `progress`.
    """

    def __init__(
        self, train_step: Callable[[], Metrics], *, max_steps: int | None = None,
        max_seconds: float | None = None, state: Mapping[str, Stateful] | None = None,
        validate: Callable[[], float] | None = None, val_every: int | None = None, score: str = "val_accuracy",
        keep: Stateful | None = None, on_validation: Callable[[], Mapping[str, float]] | None = None,
        checkpoint_dir: str | Path | None = None, checkpoint_every: int = 500, log: LogFn | None = None,
        log_every: int = 1, progress: str = "log", report_every: int | None = None, show: Sequence[str] = (),
        name: str = "", unit: str = "step", device: torch.device | str = "cpu", distributed: Replicas | None = None,
        guard: Callable[[], None] | None = None, stop_when: Callable[[], bool] | None = None,
    ) -> None:
        if max_steps is None and max_seconds is None:
            raise ValueError("a budget needs max_steps or max_seconds")
        if (validate is None) != (keep is None):
            raise ValueError("validate and keep go together: the best-validating state of `keep` is what a loop returns")
        if on_validation is not None and validate is None:
            raise ValueError("on_validation needs validate")
        cadences = {"val_every": val_every, "checkpoint_every": checkpoint_every, "log_every": log_every,
                    "report_every": report_every}
        if any(every is not None and every < 1 for every in cadences.values()):
            raise ValueError(f"every cadence must be at least 1 step, got {cadences}")
        if stop_when is not None and distributed is not None:
            raise ValueError("stop_when is for one process: ranks could answer it differently")
        if progress not in PROGRESS:
            raise ValueError(f"progress must be one of {PROGRESS}, got {progress!r}")
        self.train_step, self.max_steps, self.max_seconds = train_step, max_steps, max_seconds
        self.state = dict(state or {})
        self.validate, self.val_every, self.score, self.keep = validate, val_every, score, keep
        self.on_validation = on_validation
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every, self.log, self.log_every = checkpoint_every, log, log_every
        self.distributed = distributed
        self.is_main = distributed is None or distributed.is_main
        self.progress = progress if self.is_main else "off"
        self.report_every, self.show, self.name, self.unit = report_every, tuple(show), name, unit
        self.device = torch.device(device)
        self.guard, self.checked = guard, 0
        self.step, self.seconds = 0, 0.0
        self.best_score, self.best_step, self.best = -math.inf, 0, None
        self.history: list[dict[str, float]] = []
        self.stop_signal: int | None = None
        self.stop_when = stop_when
        self.stopped_early = False

    def run(self) -> LoopResult:
        self._resume()
        self.checked = self.step
        if self.keep is not None and self.best is None:
            self.best = copy.deepcopy(self.keep.state_dict())
        with PeakMemory(self.device) as memory, self._stop_on_signals(), self._bar() as bar:
            while not self.spent():
                if self._stop_requested():
                    self._stop()
                began = time.perf_counter()
                metrics = self.train_step()
                self.step += 1
                validating = self.validate is not None and self.val_every is not None and self.step % self.val_every == 0
                logging = self.step % self.log_every == 0
                reporting = self.progress == "log" and self.report_every is not None and self.step % self.report_every == 0
                saving = self.checkpoint_dir is not None and self.step % self.checkpoint_every == 0
                if validating or logging or reporting or saving:
                    self._check()  # before anything is read back or written; its wait for the device is step time
                self.seconds += self._slowest(time.perf_counter() - began)
                if self.spent():
                    self._check()
                    validating, saving = self.validate is not None, self.checkpoint_dir is not None
                if bar is not None:
                    bar.update(1)
                if validating or logging or reporting:
                    values = read_back(metrics)
                    if validating:
                        values.update(self._validate())
                    if logging or validating:
                        self.history.append({self.unit: self.step, **values})
                        if self.log is not None and self.is_main:
                            self.log(values, self.step)
                    self._report(values, validating, bar)
                if saving:
                    self.save()
        if self.keep is not None:
            self.keep.load_state_dict(self.best)
        return LoopResult(self.step, self.seconds, self.best_score, self.best_step, memory.peak_mb(), memory.kind,
                          self.history)

    def _check(self) -> None:
        """The guard, once per step: nothing the steps since its last call left is read, kept or saved unchecked."""
        if self.guard is not None and self.checked != self.step:
            self.guard()
        self.checked = self.step

    def spent(self) -> bool:
        return (self.max_steps is not None and self.step >= self.max_steps) or (
            self.max_seconds is not None and self.seconds >= self.max_seconds)

    def _validate(self) -> dict[str, float]:
        score = self.validate()
        if score > self.best_score:
            self.best_score, self.best_step = score, self.step
            self.best = copy.deepcopy(self.keep.state_dict())
        return {self.score: score, **(self.on_validation() if self.on_validation is not None else {})}

    def _slowest(self, seconds: float) -> float:
        """Distributed: the slowest rank's time, so a seconds budget ends at the same step everywhere."""
        return seconds if self.distributed is None else self.distributed.slowest(seconds)

    # --- signals ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM only set a flag: the loop stops between steps, never mid-update or mid-write."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(number: int, frame: object) -> None:
            self.stop_signal = number

        for number in previous:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _stop_requested(self) -> bool:
        """A signal reached this process (or, distributed, any rank: all stop at the same step), or `stop_when`."""
        if self.distributed is not None:
            self.stop_signal = self.distributed.any_signal(self.stop_signal)
        self.stopped_early = self.stop_signal is None and self.stop_when is not None and self.stop_when()
        return self.stop_signal is not None or self.stopped_early

    def _stop(self) -> None:
        name = "stop_when" if self.stopped_early else signal.Signals(self.stop_signal).name
        if self.checkpoint_dir is not None:
            self.save()
            where = f"checkpoint in {self.checkpoint_dir}; rerun the same command to resume"
        else:
            where = "no checkpoint directory was set, nothing saved"
        raise Interrupted(f"interrupted at {self.unit} {self.step} by {name}; {where}", self.stop_signal)

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the checkpoint (after the guard): a collective when distributed (every rank's states), then rank 0 writes."""
        self._check()
        state = {
            "layout": LAYOUT, "step": self.step, "seconds": self.seconds, "best_score": self.best_score,
            "best_step": self.best_step, "best": self.best, "history": self.history,
            "processes": 1 if self.distributed is None else self.distributed.world_size, **rng_states(),
            "state": {name: obj.state_dict() for name, obj in self.state.items()},
        }
        if self.is_main:
            save_checkpoint(state, self.checkpoint_dir)

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None and self.is_main else None
        if self.distributed is not None:  # other nodes may not see rank 0's disk
            state = self.distributed.broadcast_object(state)
        if state is None:
            return
        afresh = "delete it to start afresh"
        if state.get("layout") != LAYOUT or set(self.state) - set(state["state"]):
            raise DataError(f"checkpoint {self.checkpoint_dir} does not hold this training's state "
                            f"({sorted(self.state)}, layout {LAYOUT}); {afresh}")
        processes = 1 if self.distributed is None else self.distributed.world_size
        if state["processes"] != processes:
            raise DataError(f"checkpoint {self.checkpoint_dir} was written by {state['processes']} training processes, "
                            f"this run has {processes}: resume with the same number, or {afresh}")
        for name, obj in self.state.items():
            obj.load_state_dict(state["state"][name])
        restore_rng_states(state)  # last: loading a state above may have drawn
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.best_score, self.best_step, self.best = state["best_score"], state["best_step"], state["best"]
        if self.progress != "off":
            print(f"resuming from {self.checkpoint_dir} at {self.unit} {self.step}", flush=True)

    # --- progress ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _bar(self) -> Iterator[Any]:
        if self.progress != "bar":
            yield None
            return
        from tqdm import tqdm

        bar = tqdm(total=self.max_steps, initial=self.step, unit=self.unit, file=sys.stderr, dynamic_ncols=True,
                   desc=self.name or None)
        try:
            yield bar
        finally:
            bar.close()

    def _report(self, metrics: Mapping[str, float], validated: bool, bar: Any) -> None:
        """The bar's numbers, or a progress line (at each validation and every `report_every` steps)."""
        shown = {key: metrics[key] for key in self.show if key in metrics}
        if bar is not None:
            best = {"best": f"{self.best_score:.3f}"} if self.validate is not None else {}
            bar.set_postfix({**{key: f"{value:.3f}" for key, value in shown.items()}, **best})
        elif self.progress == "log" and (validated or (self.report_every and self.step % self.report_every == 0)):
            rate = self.step / self.seconds if self.seconds else 0.0
            values = "".join(f"  {key} {value:.4f}" for key, value in shown.items())
            best = f"  best {self.best_score:.4f}@{self.best_step}" if self.validate is not None else ""
            of = f"/{self.max_steps}" if self.max_steps is not None else ""
            prefix = f"{self.name}: " if self.name else ""
            print(f"{prefix}{self.unit} {self.step}{of}:{values}{best}  {rate:.2f} {self.unit}s/s"
                  f"  ETA {self._remaining_seconds(rate):.0f}s", flush=True)

    def _remaining_seconds(self, rate: float) -> float:
        left = []
        if self.max_seconds is not None:
            left.append(self.max_seconds - self.seconds)
        if self.max_steps is not None and rate > 0:
            left.append((self.max_steps - self.step) / rate)
        return max(0.0, min(left)) if left else 0.0


class Minibatches:
    """Shuffled minibatches of range(n), epoch after epoch, as a checkpointable data stream.

    One `torch.randperm(n, generator=generator)` per epoch, drawn with the epoch's first batch (a
    budget that ends on an epoch boundary draws no permutation it would not use); the last batch of
    an epoch may be short. The state: the generator, the epoch's permutation and the position in it.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1; got {n=}, {batch_size=}")
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self.order: Tensor | None = None
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(self.n / self.batch_size)

    def next(self) -> Tensor:
        """The indices of the next batch."""
        if self.order is None:
            self.order = torch.randperm(self.n, generator=self.generator).to(self.device)
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        if self.position >= self.n:
            self.order, self.position = None, 0
        return batch

    @property
    def epoch_ended(self) -> bool:
        """The last batch drawn ended an epoch (or none was drawn yet)."""
        return self.order is None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"].clone())  # set_state on a view of a larger storage segfaults
        self.order = None if state["order"] is None else state["order"].to(self.device)
        self.position = state["position"]


def read_back(metrics: Metrics) -> dict[str, Any]:
    """The metrics with every tensor read back as a float, all in one transfer (float64 holds each float dtype
    exactly, so a tensor reads as `float(tensor)` would); other values as they are."""
    tensors = {key: value for key, value in metrics.items() if isinstance(value, Tensor)}
    if not tensors:
        return dict(metrics)
    where = next(iter(tensors.values())).device
    read = torch.stack([value.detach().reshape(()).to(where, torch.float64) for value in tensors.values()]).tolist()
    floats = dict(zip(tensors, read))
    return {key: floats.get(key, value) for key, value in metrics.items()}


def rng_states() -> dict:
    """torch, numpy and Python `random` global states as tensors and JSON values (checkpoints never pickle)."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "python_rng": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }


def restore_rng_states(state: Mapping[str, Any]) -> None:
    """Inverse of `rng_states`."""
    torch.set_rng_state(state["torch_rng"])
    saved = state["numpy_rng"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))
    saved = state["python_rng"]
    random.setstate((saved["version"], tuple(int(v) for v in saved["internal"].tolist()), saved["gauss_next"]))
