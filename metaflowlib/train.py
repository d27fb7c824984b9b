"""The one meta-training loop: budget, validation, checkpoints, progress and logging.

Every method goes through `MetaTrainer`: it draws a task batch, asks the
method for the meta-gradient of omega, applies the outer optimizer, and
owns everything else. It imports no tracking library: metrics leave through
the `log` callback, so the loop runs on a bare GPU machine too.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from metaflowlib.artifacts import load_checkpoint, save_checkpoint
from metaflowlib.episodes import EpisodeSampler
from metaflowlib.errors import DataError, DivergenceError, Interrupted
from metaflowlib.memory import PeakMemory
from metaflowlib.methods import MetaLearner
from metaflowlib.methods.base import StepStats
from metaflowlib.runtime import autocast

LogFn = Callable[[dict[str, float], int], None]


class Replicas(Protocol):
    """What the loop asks of a data-parallel group; `metaflowlib.distributed.Distributed` implements it
    (not imported here: stages that only reuse this loop's types need not depend on it)."""

    rank: int
    world_size: int
    is_main: bool

    def average_gradients(self, module: torch.nn.Module, scalars: Sequence[float]) -> list[float]: ...
    def any_signal(self, signal_number: int | None) -> int | None: ...
    def slowest(self, seconds: float) -> float: ...
    def from_main(self, compute: Callable[[], float]) -> float: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def broadcast_module(self, module: torch.nn.Module) -> None: ...
    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TrainResult:
    episodes: int
    seconds: float  # meta-training wall time, validation excluded, summed over resumes
    best_val_accuracy: float
    best_episode: int
    peak_memory_mb: float
    memory_kind: str
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def episodes_per_second(self) -> float:
        return self.episodes / self.seconds if self.seconds else 0.0


def build_meta_optimizer(
    method: MetaLearner, name: str, lr: float, decay_every: int, decay: float, schedule: str = "step",
    total_steps: int | None = None,
):
    """The outer optimizer of omega and its per-meta-step schedule: a step decay, or linear from lr to 0
    over `total_steps` (Nichol et al.'s outer step size, annealed to `--meta-step-final 0`)."""
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr) if name == "adam" else torch.optim.SGD(params, lr=lr)
    if schedule == "linear":
        if not total_steps:
            raise ValueError("a linear schedule needs total_steps (an episode budget)")
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_every, gamma=decay)
    return optimizer, scheduler


class MetaTrainer:
    """Meta-train `method` on tasks from `sampler` until the budget runs out.

    Args:
        validate: omega -> validation accuracy; the best omega is kept and returned.
        max_episodes / max_seconds: the budget (whichever comes first).
        checkpoint_dir: resume from / save to here every `checkpoint_every` episodes, and on
            SIGINT/SIGTERM, which stop the loop after the current meta-step (`Interrupted`).
        log: receives {"train_loss", "train_accuracy", "val_accuracy", "lr"} per step.
        diagnose: omega -> named numbers logged with each validation (the method's `diagnostics` on a fixed
            batch of tasks: whether its assumptions hold), computed in training mode.
        progress: "bar" (tqdm), "log" (a line per validation), or "off".
        distributed: this rank's place in a torchrun group (docs/distributed.md), or None. Every rank
            passes the same arguments, its own share of the meta-batch in `sampler`; the ranks start
            from rank 0's omega, average `.grad` after each meta-gradient, stop together, and only
            rank 0 validates (the others receive its accuracy), logs, reports and writes checkpoints.
    """

    def __init__(
        self, method: MetaLearner, sampler: EpisodeSampler, optimizer: torch.optim.Optimizer, scheduler,
        *, validate: Callable[[MetaLearner], float], val_every: int, max_episodes: int | None, max_seconds: float | None,
        checkpoint_dir: Path | None = None, checkpoint_every: int = 500, log: LogFn | None = None,
        precision: torch.dtype | None = None, grad_clip: float | None = None, progress: str = "log",
        log_every: int = 10, distributed: Replicas | None = None,
        diagnose: Callable[[MetaLearner], dict[str, float]] | None = None,
    ) -> None:
        if max_episodes is None and max_seconds is None:
            raise ValueError("a budget needs max_episodes or max_seconds")
        self.method, self.sampler, self.optimizer, self.scheduler = method, sampler, optimizer, scheduler
        self.validate, self.val_every, self.diagnose = validate, val_every, diagnose
        self.max_episodes, self.max_seconds = max_episodes, max_seconds
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.distributed = distributed
        self.is_main = distributed is None or distributed.is_main
        self.log = log if log and self.is_main else (lambda metrics, step: None)
        self.precision = method.precision(precision)
        self.grad_clip, self.progress, self.log_every = grad_clip, progress if self.is_main else "off", log_every
        self.device = next(method.parameters()).device
        self.episode, self.seconds = 0, 0.0
        self.best_accuracy, self.best_episode = -1.0, 0
        self.best_state = copy.deepcopy(method.state_dict())
        self.history: list[dict[str, float]] = []
        self.stop_signal: int | None = None

    def run(self) -> TrainResult:
        self._resume()
        with PeakMemory(self.device) as memory, self._stop_on_signals():
            bar = self._progress_bar()
            while not self._budget_spent():
                if self._stop_requested():
                    self._stop()
                start = time.perf_counter()
                stats = self.meta_step()
                self.seconds += self._step_seconds(time.perf_counter() - start)
                self.episode += 1
                metrics = {"train_loss": stats.loss, "train_accuracy": stats.accuracy, "lr": self.scheduler.get_last_lr()[0]}
                if self.episode % self.val_every == 0 or self._budget_spent():
                    metrics["val_accuracy"] = self._validate()
                    if self.diagnose is not None and self.is_main:
                        self.method.train()
                        metrics.update(self.diagnose(self.method))
                    self._report(metrics)
                if self.episode % self.log_every == 0 or "val_accuracy" in metrics:
                    self.log(metrics, self.episode)
                    self.history.append({"episode": self.episode, **metrics})
                if self.checkpoint_dir and (self.episode % self.checkpoint_every == 0 or self._budget_spent()):
                    self._save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats.loss:.3f}", val=f"{self.best_accuracy:.3f}")
            if bar is not None:
                bar.close()
        self.method.load_state_dict(self.best_state)
        return TrainResult(self.episode, self.seconds, self.best_accuracy, self.best_episode, memory.peak_mb(), memory.kind, self.history)

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM only set a flag: the loop stops between meta-steps, never mid-write."""
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
        """A signal reached this process (or, distributed, any rank: all stop at the same step)."""
        if self.distributed is not None:
            self.stop_signal = self.distributed.any_signal(self.stop_signal)
        return self.stop_signal is not None

    def _step_seconds(self, seconds: float) -> float:
        """Distributed: the slowest rank's time, so a seconds budget ends at the same step everywhere."""
        return seconds if self.distributed is None else self.distributed.slowest(seconds)

    def _stop(self) -> None:
        name = signal.Signals(self.stop_signal).name
        if self.checkpoint_dir:
            self._save()
            where = f"checkpoint in {self.checkpoint_dir}; rerun the same command to resume"
        else:
            where = "no checkpoint directory was set, nothing saved"
        raise Interrupted(f"interrupted at episode {self.episode} by {name}; {where}", self.stop_signal)

    def meta_step(self):
        """One outer step: draw a task batch, accumulate the meta-gradient, guard against divergence, update omega."""
        self.method.train()
        episode = next(self.sampler)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            stats = self.method.meta_gradient(episode)
        if self.distributed is not None:  # before the guard and the clip: every rank then decides alike
            stats = StepStats(*self.distributed.average_gradients(self.method, (stats.loss, stats.accuracy)))
        if not math.isfinite(stats.loss) or not gradients_finite(self.method):
            where = f"; last good checkpoint: {self.checkpoint_dir}" if self.checkpoint_dir else ""
            raise DivergenceError(f"non-finite meta-loss or gradient at episode {self.episode + 1} (loss {stats.loss}){where}")
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return stats

    def _validate(self) -> float:
        if self.distributed is None:
            accuracy = self.validate(self.method)
        else:
            accuracy = self.distributed.from_main(lambda: self.validate(self.method))
        if accuracy > self.best_accuracy:
            self.best_accuracy, self.best_episode = accuracy, self.episode
            self.best_state = copy.deepcopy(self.method.state_dict())
        return accuracy

    def _budget_spent(self) -> bool:
        return (self.max_episodes is not None and self.episode >= self.max_episodes) or (
            self.max_seconds is not None and self.seconds >= self.max_seconds
        )

    def _report(self, metrics: dict[str, float]) -> None:
        if self.progress == "log":
            rate = self.episode / self.seconds if self.seconds else 0.0
            remaining = self._remaining_seconds(rate)
            print(
                f"episode {self.episode}: loss {metrics['train_loss']:.4f}  val {metrics['val_accuracy']:.4f}"
                f"  best {self.best_accuracy:.4f}@{self.best_episode}  {rate:.2f} ep/s  ETA {remaining:.0f}s",
                flush=True,
            )

    def _remaining_seconds(self, rate: float) -> float:
        left = []
        if self.max_seconds is not None:
            left.append(self.max_seconds - self.seconds)
        if self.max_episodes is not None and rate > 0:
            left.append((self.max_episodes - self.episode) / rate)
        return max(0.0, min(left)) if left else 0.0

    def _progress_bar(self):
        if self.progress != "bar":
            return None
        from tqdm import tqdm

        return tqdm(total=self.max_episodes, initial=self.episode, unit="ep", file=sys.stderr, dynamic_ncols=True)

    def _state(self) -> dict:
        return {
            "episode": self.episode,
            "seconds": self.seconds,
            "best_accuracy": self.best_accuracy,
            "best_episode": self.best_episode,
            "omega": self.method.state_dict(),
            "best_omega": self.best_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state() if self.distributed is None else self.distributed.gather(self.sampler.state()),
            "processes": 1 if self.distributed is None else self.distributed.world_size,
            **rng_states(),
            "history": self.history,
        }

    def _save(self) -> None:
        state = self._state()  # distributed: a collective (every rank's sampler state), then rank 0 writes
        if self.is_main:
            save_checkpoint(state, self.checkpoint_dir)

    def _resume(self) -> None:
        """Distributed: rank 0 alone reads the checkpoint (other nodes may not see its disk) and sends it."""
        state = load_checkpoint(self.checkpoint_dir) if self.checkpoint_dir and self.is_main else None
        if self.distributed is not None:
            state = self.distributed.broadcast_object(state)
            if state is None:
                self.distributed.broadcast_module(self.method)
                self.best_state = copy.deepcopy(self.method.state_dict())
        if state is None:
            return
        processes = 1 if self.distributed is None else self.distributed.world_size
        if state.get("processes", 1) != processes:
            raise DataError(f"checkpoint {self.checkpoint_dir} was written by {state.get('processes', 1)} training processes, "
                            f"this run has {processes}: resume with the same number, or delete it to start afresh")
        self.method.load_state_dict(state["omega"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # clone: Generator.set_state on a row view at a non-zero storage offset segfaults (torch 2.13)
        self.sampler.load_state(state["sampler"] if self.distributed is None else state["sampler"][self.distributed.rank].clone())
        restore_rng_states(state)
        self.episode, self.seconds = state["episode"], state["seconds"]
        self.best_accuracy, self.best_episode = state["best_accuracy"], state["best_episode"]
        self.best_state, self.history = state["best_omega"], state["history"]
        if self.progress != "off":
            print(f"resuming from {self.checkpoint_dir} at episode {self.episode}", flush=True)


def gradients_finite(module: torch.nn.Module) -> bool:
    """One device sync for every parameter's gradient (a per-tensor check stalls a GPU once per tensor)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


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


def restore_rng_states(state: dict) -> None:
    """Inverse of `rng_states`; a checkpoint written before numpy/Python states were saved restores torch's only."""
    torch.set_rng_state(state["torch_rng"])
    if "numpy_rng" in state:
        saved = state["numpy_rng"]
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))
    if "python_rng" in state:
        saved = state["python_rng"]
        random.setstate((saved["version"], tuple(int(v) for v in saved["internal"].tolist()), saved["gauss_next"]))
