"""Meta-knowledge and training checkpoints as safetensors + JSON. Nothing here unpickles.

- omega (`save_meta_knowledge`): `model.safetensors` (state dict) and
  `config.json` ({kind, config, extra}) in one directory, written atomically.
- training checkpoints (`save_checkpoint`): any nest of dicts/lists/scalars
  and tensors (optimizer and scheduler state, RNG states, counters) split
  into `state.safetensors` (tensors) and `state.json` (the structure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from metaflowlib import __version__
from metaflowlib.errors import DataError
from metaflowlib.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_path,
    load_tensors,
    read_tensor_dir,
    write_tensor_dir,
)
from metaflowlib.methods import METHODS, MetaLearner, build_method


def save_meta_knowledge(method: MetaLearner, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write omega; `extra` carries what serving needs (image size, lineage)."""
    config = {"kind": method.kind, "config": method.config(), "extra": extra or {}, "metaflowlib": __version__}
    return write_tensor_dir(directory, method.state_dict(), config)


def load_meta_knowledge(directory: str | Path, device: str | torch.device = "cpu") -> tuple[MetaLearner, dict[str, Any]]:
    """Rebuild omega from its directory: (method in eval mode, its config.json)."""
    directory = Path(directory)
    config, state = read_tensor_dir(directory)
    if config.get("kind") not in METHODS or not isinstance(config.get("config"), dict):
        raise DataError(f"{directory / CONFIG_FILE}: 'kind' must be one of {sorted(METHODS)} with a 'config' object")
    method = build_method(config["kind"], **{**METHODS[config["kind"]].legacy_defaults, **config["config"]})
    expected = set(method.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise DataError(f"{directory / WEIGHTS_FILE} does not match its config: missing {missing}, unexpected {unexpected}")
    method.load_state_dict(state)
    return method.to(device).eval(), config


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> None:
    """Atomically replace the checkpoint in `directory` (a crash leaves the previous one intact)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "state")
    with atomic_path(directory, is_dir=True) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton))


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The saved state, or None when no checkpoint exists; a damaged one is a DataError, never unpickled."""
    directory = Path(directory)
    if not (directory / "state.json").is_file():
        return None
    tensors = load_tensors(directory / "state.safetensors")
    try:
        return _unflatten(json.loads((directory / "state.json").read_text()), tensors)
    except (json.JSONDecodeError, KeyError) as error:
        raise DataError(f"checkpoint {directory} is damaged ({type(error).__name__}: {error}); delete it to start afresh") from None
