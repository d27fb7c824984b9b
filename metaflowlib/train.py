"""Meta-training: every method's outer step, run by the one training loop (`metaflowlib.loop.Loop`).

Every method goes through `MetaTrainer`: its step draws a task batch, asks the
method for the meta-gradient of omega and applies the outer optimizer; the
loop owns the budget, validation, checkpoints, signals, progress and logging.
A step never waits for the device: its metrics stay tensors until the loop logs
them, and the divergence guard is a device flag the loop checks before it logs,
validates or writes a checkpoint.
It imports no tracking library: metrics leave through the `log` callback, so
meta-training runs on a bare GPU machine too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metaflowlib.episodes import EpisodeSampler, TaskPool, fixed_episodes
from metaflowlib.errors import DivergenceError
from metaflowlib.evaluate import embed_pool, evaluate_setting
from metaflowlib.loop import LogFn, Loop, Replicas, restore_rng_states, rng_states
from metaflowlib.methods import MetaLearner
from metaflowlib.methods.base import StepStats
from metaflowlib.runtime import autocast

__all__ = [
    "LogFn",
    "MetaTrainer",
    "Replicas",
    "TrainResult",
    "build_meta_optimizer",
    "gradient_norm",
    "restore_rng_states",
    "rng_states",
]


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
    over `total_steps` (Nichol et al.'s outer step size, annealed to `--meta-step-final 0`).

    Adam is the fused kernel (`fused=True`: one launch for every parameter) when omega is on CUDA; on a CPU
    the default (foreach) Adam, whose updates the recorded omega digests pin."""
    params = [p for p in method.parameters() if p.requires_grad]
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    optimizer = torch.optim.Adam(params, lr=lr, **fused) if name == "adam" else torch.optim.SGD(params, lr=lr)
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
        log: receives {"train_loss", "train_accuracy", "lr"} every `log_every` episodes, with "val_accuracy"
            at each validation.
        grad_clip: clip the meta-gradient to this 2-norm before the update (None: no clipping).
        diagnose: omega -> named numbers logged with each validation (the method's `diagnostics` on a fixed
            batch of tasks: whether its assumptions hold), computed in training mode.
        progress: "bar" (tqdm), "log" (a line per validation), or "off".
        distributed: this rank's place in a torchrun group (docs/distributed.md), or None. Every rank
            passes the same arguments, its own share of the meta-batch in `sampler`; the ranks start
            from rank 0's omega, average `.grad` after each meta-gradient, stop together, and only
            rank 0 validates (the others receive its accuracy), logs, reports and writes checkpoints.
        stop_when: asked between meta-steps; True checkpoints and stops as a signal does (`Loop`).

    The loop is built by `run`, from the attributes as they are then; `meta_step` alone drives no loop
    (the throughput benchmarks time it).

    Divergence: each step folds "loss and meta-gradient finite" into `finite`, a flag on the device (no host
    sync); the loop's guard (`check_finite`) reads it before it logs, validates or writes a checkpoint, and
    raises DivergenceError naming the episodes since the last check. Omega after a non-finite step is not
    rolled back: the steps of that window are discarded with the run, as no validation keeps and no
    checkpoint saves a state the guard has not passed (so `method` holds the diverged omega after the error).
    """

    def __init__(
        self, method: MetaLearner, sampler: EpisodeSampler, optimizer: torch.optim.Optimizer, scheduler,
        *, validate: Callable[[MetaLearner], float], val_every: int, max_episodes: int | None, max_seconds: float | None,
        checkpoint_dir: Path | None = None, checkpoint_every: int = 500, log: LogFn | None = None,
        precision: torch.dtype | None = None, grad_clip: float | None = None, progress: str = "log",
        log_every: int = 10, distributed: Replicas | None = None,
        diagnose: Callable[[MetaLearner], dict[str, float]] | None = None, stop_when: Callable[[], bool] | None = None,
    ) -> None:
        if max_episodes is None and max_seconds is None:
            raise ValueError("a budget needs max_episodes or max_seconds")
        self.method, self.sampler, self.optimizer, self.scheduler = method, sampler, optimizer, scheduler
        self.validate, self.val_every, self.diagnose, self.stop_when = validate, val_every, diagnose, stop_when
        self.max_episodes, self.max_seconds = max_episodes, max_seconds
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.distributed = distributed
        self.is_main = distributed is None or distributed.is_main
        self.log, self.log_every, self.progress = log, log_every, progress
        self.precision = method.precision(precision)
        self.grad_clip = grad_clip
        self.device = next(method.parameters()).device
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)  # every step since the last check
        self.loop: Loop | None = None

    @property
    def episode(self) -> int:
        return 0 if self.loop is None else self.loop.step

    @property
    def seconds(self) -> float:
        return 0.0 if self.loop is None else self.loop.seconds

    @property
    def history(self) -> list[dict[str, float]]:
        return [] if self.loop is None else self.loop.history

    def run(self, log: LogFn | None = None) -> TrainResult:
        """Train until the budget is spent (or resume and finish); `log` replaces the constructor's callback."""
        if self.distributed is not None:  # every rank starts from rank 0's omega (a checkpoint, if any, replaces it)
            self.distributed.broadcast_module(self.method)
        self.loop = Loop(
            self.meta_step, max_steps=self.max_episodes, max_seconds=self.max_seconds,
            state={"omega": self.method, "optimizer": self.optimizer, "scheduler": self.scheduler,
                   "sampler": SamplerState(self.sampler, self.distributed)},
            validate=self._validate, val_every=self.val_every, keep=self.method,
            on_validation=self._diagnose if self.diagnose is not None else None,
            checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every, log=log or self.log,
            log_every=self.log_every, progress=self.progress, show=("train_loss", "val_accuracy"), unit="episode",
            device=self.device, distributed=self.distributed, guard=self.check_finite, stop_when=self.stop_when,
        )
        result = self.loop.run()
        return TrainResult(result.steps, result.seconds, result.best_score, result.best_step, result.peak_memory_mb,
                           result.memory_kind, result.history)

    def meta_step(self) -> dict[str, torch.Tensor | float]:
        """One outer step: draw a task batch, accumulate the meta-gradient, fold the divergence check into
        `finite`, update omega. Returns the loss and accuracy as 0-dim tensors where omega is (no host sync)."""
        self.method.train()
        episode = next(self.sampler)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            stats = self.method.meta_gradient(episode)
        if self.distributed is not None:  # before the guard and the clip: every rank then decides alike
            stats = StepStats(*self.distributed.average_gradients(self.method, (stats.loss, stats.accuracy)))
        if self.grad_clip:  # the norm before clipping
            norm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
        else:
            norm = gradient_norm(self.method)
        self.finite &= torch.isfinite(norm + torch.as_tensor(stats.loss, device=self.device))  # a NaN or inf in either
        self.optimizer.step()
        self.scheduler.step()
        return {"train_loss": stats.loss, "train_accuracy": stats.accuracy, "lr": self.scheduler.get_last_lr()[0]}

    def check_finite(self) -> None:
        """The loop's guard: one host sync, for every step since the last check."""
        if bool(self.finite):
            return
        checked, now = (0, self.episode) if self.loop is None else (self.loop.checked, self.loop.step)
        where = f"; last good checkpoint: {self.checkpoint_dir}" if self.checkpoint_dir else ""
        raise DivergenceError(f"non-finite meta-loss or gradient in episodes {checked + 1}-{now} (checked before each log, "
                              f"validation and checkpoint: no omega after episode {checked} was validated or saved){where}")

    def _validate(self) -> float:
        if self.distributed is None:
            return self.validate(self.method)
        return self.distributed.from_main(lambda: self.validate(self.method))

    def _diagnose(self) -> dict[str, float]:
        """Rank 0 only; after the best omega is kept, as the diagnostics' forward passes may move buffers."""
        if not self.is_main:
            return {}
        self.method.train()
        return self.diagnose(self.method)


class SamplerState:
    """The task stream's generator state; distributed: every rank's, stacked (a collective), each rank resuming
    from its own row."""

    def __init__(self, sampler: EpisodeSampler, distributed: Replicas | None) -> None:
        self.sampler, self.distributed = sampler, distributed

    def state_dict(self) -> torch.Tensor:
        state = self.sampler.state()
        return state if self.distributed is None else self.distributed.gather(state)

    def load_state_dict(self, state: torch.Tensor) -> None:
        # clone: Generator.set_state on a row view at a non-zero storage offset segfaults (torch 2.13)
        self.sampler.load_state(state if self.distributed is None else state[self.distributed.rank].clone())


def validation_accuracy(pool: TaskPool, *, ways: int, shots: int, queries: int, tasks: int, seed: int, batch_tasks: int,
                        dtype: torch.dtype | None) -> Callable[[MetaLearner], float]:
    """omega -> accuracy on the same fixed validation tasks at every validation (a fixed N-way head on N-way tasks);
    a frozen feature map's validation features are computed once."""
    cached: dict[str, TaskPool] = {}

    def validate(method: MetaLearner) -> float:
        method.eval()
        features = None
        if method.per_example_features:
            if not method.frozen_features or "features" not in cached:
                cached["features"] = embed_pool(method, pool, dtype)
            features = cached["features"]
        return evaluate_setting(method, pool, features, method.fixed_ways or ways, shots, queries, tasks, seed,
                                batch_tasks, dtype).accuracy

    return validate


def diagnostics_on(pool: TaskPool, ways: int, shots: int, queries: int, seed: int) -> Callable[[MetaLearner], dict[str, float]]:
    """omega -> the method's `diagnostics` on 8 fixed tasks of its own training shape."""
    episode = pool.gather(fixed_episodes(pool, 8, ways, shots, queries, seed))
    return lambda method: method.diagnostics(episode)


def gradient_norm(module: torch.nn.Module) -> torch.Tensor:
    """The 2-norm of every parameter's gradient together, a 0-dim tensor where they are (a fused kernel per device
    and dtype, no host sync): finite exactly when every gradient is, or overflowing past about 1e19 in float32."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=next(module.parameters()).device)
