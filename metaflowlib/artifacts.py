"""Meta-knowledge and training checkpoints as safetensors + JSON. Nothing here unpickles.

- omega (`save_meta_knowledge`): `model.safetensors` (state dict) and
  `config.json` ({kind, config, extra}) in one directory, written atomically.
- training checkpoints (`save_checkpoint`, defined in `metaflowlib.io` so that the training
  loop needs no method code): any nest of dicts/lists/scalars and tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metaflowlib import __version__
from metaflowlib.io import load_built, load_checkpoint, save_checkpoint, write_tensor_dir
from metaflowlib.methods import METHODS, MetaLearner, build_method

__all__ = ["load_checkpoint", "load_meta_knowledge", "save_checkpoint", "save_meta_knowledge"]


def save_meta_knowledge(method: MetaLearner, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write omega; `extra` carries what serving needs (image size, lineage)."""
    config = {"kind": method.kind, "config": method.config(), "extra": extra or {}, "metaflowlib": __version__}
    return write_tensor_dir(directory, method.state_dict(), config)


def load_meta_knowledge(directory: str | Path, device: str | torch.device = "cpu") -> tuple[MetaLearner, dict[str, Any]]:
    """Rebuild omega from its directory: (method in eval mode, its config.json)."""
    return load_built(directory, METHODS, lambda kind, config: build_method(kind, **{**METHODS[kind].legacy_defaults, **config}),
                      device)
