"""Supervised pre-training of a feature map: one many-way classifier over every training class.

Parameter prediction (Qiao et al. 2018; Gidaris & Komodakis 2018) reads the
activations of a feature map trained this way and frozen afterwards. The
classifier is cosine with a learned scale (Gidaris & Komodakis, section 3.2):
it shapes unit-norm activations, which are what the predictor reads. It runs
on the one training loop (`metaflowlib.loop.Loop`): one step per minibatch,
validation after each epoch, the feature map that validates best kept,
checkpoints and resume; metrics leave through `log`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.episodes import TaskPool
from metaflowlib.errors import DivergenceError
from metaflowlib.loop import LogFn, Loop, Minibatches
from metaflowlib.precision import Candidate, Probe, has_convolutions
from metaflowlib.runtime import autocast


@dataclass
class PretrainResult:
    epochs: float  # passes over the training split (fractional when the time budget ends mid-epoch)
    steps: int
    seconds: float  # training wall time, validation excluded
    best_val_accuracy: float
    best_epoch: int
    peak_memory_mb: float
    memory_kind: str
    history: list[dict[str, float]] = field(default_factory=list)


class CosineClassifier(nn.Module):
    """logits = s * cos(w_c, f(x)) over C classes, s learned."""

    def __init__(self, dim: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * dim**-0.5)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, z: Tensor) -> Tensor:
        """fp32 even under autocast: bf16 logits over thousands of classes lose the loss's precision."""
        with torch.autocast(z.device.type, enabled=False):
            return self.log_scale.exp() * F.normalize(z.float(), dim=-1) @ F.normalize(self.weight, dim=-1).T


def pretrain_probe(feature_map: nn.Module, pool: TaskPool, *, dim: int, batch_size: int, lr: float, scale: float) -> Probe:
    """Pre-training's step (below) on copies of `feature_map` and a fresh head, on one fixed minibatch of `pool`:
    what `metaflowlib.precision.choose` times for `auto`."""
    device = pool.examples.device
    batch = torch.arange(min(batch_size, pool.examples.shape[0]), device=device) * (pool.examples.shape[0] // batch_size or 1)
    images = pool.examples[batch]
    labels = torch.repeat_interleave(torch.arange(pool.num_classes, device=device), pool.counts.to(device))[batch]

    def make(candidate: Candidate) -> Callable[[], None]:
        model = copy.deepcopy(feature_map).train()
        if candidate[1]:
            model = model.to(memory_format=torch.channels_last)
        head = CosineClassifier(dim, pool.num_classes, scale).to(device)
        optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=lr)
        dtype = torch.bfloat16 if candidate[0] == "bf16" else None

        def step() -> None:
            with autocast(device, dtype):
                logits = head(model(images))
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(logits, labels).backward()
            optimizer.step()

        return step

    key = {"kind": "pretrain_step", "feature_map": repr(feature_map), "batch": list(images.shape), "classes": pool.num_classes, "dim": dim}
    return Probe(make, key, layouts=has_convolutions(feature_map))


def pretrain_feature_map(
    feature_map: nn.Module, pool: TaskPool, *, dim: int, batch_size: int, lr: float, scale: float,
    max_epochs: int | None, max_seconds: float | None, validate: Callable[[], float], seed: int = 0,
    precision: torch.dtype | None = None, log: LogFn | None = None, progress: bool = True, log_every: int = 50,
    checkpoint_dir: Path | None = None, checkpoint_every: int = 500,
) -> PretrainResult:
    """Train `feature_map` (in place) to classify every class of `pool`; validate after each epoch.

    Returns with the feature map that scored best on `validate` (e.g. nearest-centroid
    accuracy on validation tasks) loaded. `checkpoint_dir`: resume from / save to here
    every `checkpoint_every` steps and on SIGINT/SIGTERM (see `Loop`).
    """
    if max_epochs is None and max_seconds is None:
        raise ValueError("a pre-training budget needs max_epochs or max_seconds")
    device = pool.examples.device
    labels = torch.repeat_interleave(torch.arange(pool.num_classes, device=device), pool.counts.to(device))
    head = CosineClassifier(dim, pool.num_classes, scale).to(device)
    optimizer = torch.optim.Adam([*feature_map.parameters(), *head.parameters()], lr=lr)
    batches = Minibatches(labels.numel(), batch_size, torch.Generator().manual_seed(seed), device)
    per_epoch = len(batches)

    def step() -> dict[str, float]:
        feature_map.train()
        batch = batches.next()
        with autocast(device, precision):
            logits = head(feature_map(pool.examples[batch]))
        loss = F.cross_entropy(logits, labels[batch])
        if not torch.isfinite(loss):
            raise DivergenceError(f"non-finite pre-training loss at step {loop.step + 1} (epoch {loop.step // per_epoch + 1}); "
                                  "lower pretrain.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"pretrain_loss": float(loss.detach()), "pretrain_accuracy": float((logits.argmax(-1) == labels[batch]).float().mean())}

    def validate_eval() -> float:
        feature_map.eval()
        return validate()

    loop = Loop(
        step, max_steps=None if max_epochs is None else max_epochs * per_epoch, max_seconds=max_seconds,
        state={"feature_map": feature_map, "head": head, "optimizer": optimizer, "batches": batches},
        validate=validate_eval, val_every=per_epoch, keep=feature_map, on_validation=lambda: {"epoch": loop.step / per_epoch},
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, log=log, log_every=log_every,
        progress="log" if progress else "off", show=("pretrain_loss", "val_accuracy"), name="pretrain", device=device,
    )
    result = loop.run()
    feature_map.eval()
    history = [{key: row[key] for key in ("epoch", "step", "pretrain_loss", "val_accuracy")}
               for row in result.history if "val_accuracy" in row]
    return PretrainResult(result.steps / per_epoch, result.steps, result.seconds, result.best_score,
                          math.ceil(result.best_step / per_epoch), result.peak_memory_mb, result.memory_kind, history)
