"""Supervised pre-training of a feature map: one many-way classifier over every training class.

Parameter prediction (Qiao et al. 2018; Gidaris & Komodakis 2018) reads the
activations of a feature map trained this way and frozen afterwards. The
classifier is cosine with a learned scale (Gidaris & Komodakis, section 3.2):
it shapes unit-norm activations, which are what the predictor reads. Like
`MetaTrainer`, this loop imports no tracking library (metrics leave through
`log`) and keeps the feature map that validates best.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.episodes import TaskPool
from metaflowlib.errors import DivergenceError
from metaflowlib.memory import PeakMemory
from metaflowlib.runtime import autocast
from metaflowlib.train import LogFn


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


def pretrain_feature_map(
    feature_map: nn.Module, pool: TaskPool, *, dim: int, batch_size: int, lr: float, scale: float,
    max_epochs: int | None, max_seconds: float | None, validate: Callable[[], float], seed: int = 0,
    precision: torch.dtype | None = None, log: LogFn | None = None, progress: bool = True, log_every: int = 50,
) -> PretrainResult:
    """Train `feature_map` (in place) to classify every class of `pool`; validate after each epoch.

    Returns with the feature map that scored best on `validate` (e.g. nearest-centroid
    accuracy on validation tasks) loaded.
    """
    if max_epochs is None and max_seconds is None:
        raise ValueError("a pre-training budget needs max_epochs or max_seconds")
    device = pool.examples.device
    labels = torch.repeat_interleave(torch.arange(pool.num_classes, device=device), pool.counts.to(device))
    head = CosineClassifier(dim, pool.num_classes, scale).to(device)
    optimizer = torch.optim.Adam([*feature_map.parameters(), *head.parameters()], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    log = log or (lambda metrics, step: None)
    n, steps_per_epoch = labels.numel(), math.ceil(labels.numel() / batch_size)
    seconds, step, epoch, history = 0.0, 0, 0, []
    best_accuracy, best_epoch, best_state = -1.0, 0, copy.deepcopy(feature_map.state_dict())

    def spent() -> bool:
        return (max_epochs is not None and epoch >= max_epochs) or (max_seconds is not None and seconds >= max_seconds)

    with PeakMemory(device) as memory:
        while not spent():
            feature_map.train()
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, batch_size):
                began = time.perf_counter()
                batch = order[start : start + batch_size]
                with autocast(device, precision):
                    logits = head(feature_map(pool.examples[batch]))
                loss = F.cross_entropy(logits, labels[batch])
                if not torch.isfinite(loss):
                    raise DivergenceError(f"non-finite pre-training loss at step {step + 1} (epoch {epoch + 1}); lower pretrain.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seconds += time.perf_counter() - began
                step += 1
                loss = loss.detach()
                if step % log_every == 0:
                    train_accuracy = float((logits.argmax(-1) == labels[batch]).float().mean())
                    log({"pretrain_loss": float(loss), "pretrain_accuracy": train_accuracy}, step)
                if max_seconds is not None and seconds >= max_seconds:
                    break
            epoch += 1
            feature_map.eval()
            accuracy = validate()
            epochs_done = step / steps_per_epoch
            history.append({"epoch": epochs_done, "step": step, "pretrain_loss": float(loss), "val_accuracy": accuracy})
            log({"val_accuracy": accuracy, "epoch": epochs_done}, step)
            if accuracy > best_accuracy:
                best_accuracy, best_epoch, best_state = accuracy, epoch, copy.deepcopy(feature_map.state_dict())
            if progress:
                print(f"pretrain epoch {epochs_done:.2f}: loss {float(loss):.4f}  val {accuracy:.4f}  best {best_accuracy:.4f}@{best_epoch}"
                      f"  {seconds:.0f}s", flush=True)
    feature_map.load_state_dict(best_state)
    feature_map.eval()
    return PretrainResult(step / steps_per_epoch, step, seconds, best_accuracy, best_epoch, memory.peak_mb(), memory.kind, history)
