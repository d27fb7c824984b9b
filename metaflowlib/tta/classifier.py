"""The source classifiers that test-time adaptation starts from, and how they are trained and stored.

Two kinds share one main branch (Conv-4 with BatchNorm, then a linear head):
- `source`: the plain classifier, trained on cross-entropy (what TENT and BN adapt);
- `ttt`: its TTT twin (`TTTModel.conv4`), the same branch split after
  `shared_blocks` blocks plus a rotation branch, trained on `joint_loss`.

Training runs on the one training loop (`metaflowlib.loop.Loop`), a step per minibatch.
Stored as `model.safetensors` + `config.json` ({kind, config, extra}); loading never unpickles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.io import load_built, write_tensor_dir
from metaflowlib.loop import LogFn, Loop, Minibatches
from metaflowlib.models import Conv4, conv4_output_dim
from metaflowlib.runtime import autocast
from metaflowlib.tta.strategies import TTTModel, joint_loss

KINDS = ("source", "ttt")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train pixel mean/std in [0, 1]


class Classifier(nn.Module):
    """Conv-4 features -> linear head: images [B, 1, H, W] -> logits [B, N]."""

    def __init__(self, num_classes: int, image_size: int, hidden: int = 64) -> None:
        super().__init__()
        self.features = Conv4(1, hidden)
        self.head = nn.Linear(conv4_output_dim(image_size, hidden), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_classifier(kind: str, num_classes: int, image_size: int, hidden: int, shared_blocks: int = 2) -> nn.Module:
    if kind == "source":
        return Classifier(num_classes, image_size, hidden)
    if kind == "ttt":
        return TTTModel.conv4(num_classes, image_size, hidden=hidden, shared_blocks=shared_blocks)
    raise ValueError(f"unknown classifier kind {kind!r}; expected one of {KINDS}")


def to_input(images: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 [N, H, W] -> standardized float32 [N, 1, H, W]."""
    x = torch.as_tensor(images).to(device)
    return ((x.float() / 255 - MEAN) / STD).unsqueeze(1)


def training_loss(kind: str) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """Cross-entropy for the source classifier; main CE + rotation CE (Sun et al. eq. 2) for the TTT twin."""
    return joint_loss if kind == "ttt" else lambda model, x, y: F.cross_entropy(model(x), y)


@dataclass
class TrainResult:
    seconds: float  # training step time, summed over resumes
    steps: int
    history: list[dict[str, float]]  # one row per epoch: epoch, train_loss


class EpochLoss:
    """The running mean of the training loss over the epoch so far, weighted by batch size (a short last batch
    counts for less); checkpointed, so a resumed epoch reports the mean over all its batches."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, loss: float, examples: int) -> float:
        self.total, self.count = self.total + loss * examples, self.count + examples
        return self.total / self.count

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.total, self.count = state["total"], state["count"]


def train_classifier(
    model: nn.Module,
    kind: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    log: LogFn | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 100,
    progress: bool = False,
) -> TrainResult:
    """Adam on shuffled minibatches for `epochs` epochs; the model ends in eval mode.

    `log` receives each epoch's mean training loss at the epoch's number; `checkpoint_dir`: resume from /
    save to here every `checkpoint_every` minibatches and on SIGINT/SIGTERM (see `Loop`); `progress`: a line
    per epoch.
    """
    loss_fn = training_loss(kind)
    x_all, y_all = torch.as_tensor(images), torch.as_tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = Minibatches(len(y_all), batch_size, torch.Generator().manual_seed(seed))
    epoch_loss, per_epoch = EpochLoss(), len(batches)

    def step() -> dict[str, float]:
        model.train()
        index = batches.next()
        x = to_input(x_all[index], device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            loss = loss_fn(model, x, y_all[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean = epoch_loss.add(loss.item(), len(index))
        if batches.epoch_ended:
            epoch_loss.reset()
        return {"train_loss": mean}

    result = Loop(
        step, max_steps=epochs * per_epoch,
        state={"model": model, "optimizer": optimizer, "batches": batches, "epoch_loss": epoch_loss},
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        log=None if log is None else (lambda metrics, step: log(metrics, step // per_epoch)), log_every=per_epoch,
        progress="log" if progress else "off", report_every=per_epoch, show=("train_loss",), name=kind, device=device,
    ).run()
    model.eval()
    history = [{"epoch": row["step"] // per_epoch, "train_loss": row["train_loss"]} for row in result.history]
    return TrainResult(result.seconds, result.steps, history)


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int = 500) -> float:
    """Accuracy in eval mode (BatchNorm running statistics): each image independent of its batch."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(to_input(images[start : start + batch_size], device))
        correct += int((logits.argmax(1).cpu() == torch.as_tensor(labels[start : start + batch_size])).sum())
    return correct / len(labels)


def save_classifier(model: nn.Module, directory: str | Path, kind: str, config: dict[str, Any], extra: dict[str, Any]) -> Path:
    """`config` holds `build_classifier`'s arguments (the shape a load rebuilds); `extra` the lineage."""
    return write_tensor_dir(directory, model.state_dict(), {"kind": kind, "config": config, "extra": extra})


def load_classifier(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, its config.json); weights that do not match the config are refused."""
    return load_built(directory, KINDS, lambda kind, config: build_classifier(kind, **config), device)
