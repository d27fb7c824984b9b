"""Atomic file output, checksums, tensor directories and training checkpoints (safetensors + JSON): never a partial
file, never a pickle."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a not-yet-existing temporary path; rename it onto `target` only on success.

    For a directory (`is_dir=True`) the caller creates it; an existing target
    is moved aside and removed after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    work = tmp / target.name
    try:
        yield work
        if is_dir and target.exists():
            os.replace(target, tmp / ".previous")
        os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting at most `timeout` seconds (then TimeoutError).

    The kernel drops the lock when its holder exits, so a killed process leaves no stale lock behind.
    """
    import fcntl

    deadline = time.monotonic() + timeout
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} is still locked after {timeout:.0f}s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically, pretty-printed so DVC metrics diff cleanly."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """Write rows atomically as CSV with these columns (keys of a row outside them are left out)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def write_tensor_dir(directory: str | os.PathLike, tensors: dict[str, Any], config: dict[str, Any]) -> Path:
    """`model.safetensors` + `config.json` in one directory that appears whole or not at all."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_path(directory, is_dir=True) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def load_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """safetensors only: a pickle or any other file under this name is refused, never executed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from metaflowlib.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"{path} is not a valid safetensors file ({error}); refusing to load it") from None


def read_tensor_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, tensors) written by `write_tensor_dir`; JSON and safetensors only, never pickle."""
    from metaflowlib.errors import DataError

    directory = Path(directory)
    config = read_mapping(directory / CONFIG_FILE, json.loads, json.JSONDecodeError, DataError,
                          "is missing: not a directory written by metaflowlib")
    return config, load_tensors(directory / WEIGHTS_FILE)


def read_mapping(path: str | os.PathLike, parse: Callable[[str], Any], parse_error: type[Exception],
                 error: type[Exception], missing: str) -> dict[str, Any]:
    """A JSON or YAML file that must hold a mapping; a missing, unparsable or non-mapping file is one `error`
    naming the path (`missing` says why the file should be there)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} {missing}")
    try:
        data = parse(path.read_text())
    except parse_error as problem:
        raise error(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'text'}: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def load_built(directory: str | os.PathLike, kinds: Iterable[str], build: Callable[[str, dict[str, Any]], Any],
               device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """(module in eval mode on `device`, its config.json) from a tensor directory whose config names one of `kinds`
    and `build(kind, config)` rebuilds; weights that do not match the rebuilt module are refused."""
    from metaflowlib.errors import DataError

    directory = Path(directory)
    config, state = read_tensor_dir(directory)
    kinds = sorted(kinds)
    if config.get("kind") not in kinds or not isinstance(config.get("config"), dict):
        raise DataError(f"{directory / CONFIG_FILE}: 'kind' must be one of {kinds} with a 'config' object")
    module = build(config["kind"], config["config"])
    expected = set(module.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise DataError(f"{directory / WEIGHTS_FILE} does not match its config: missing {missing}, unexpected {unexpected}")
    module.load_state_dict(state)
    return module.to(device).eval(), config


def _flatten(obj: Any, tensors: dict[str, Any], path: str) -> Any:
    import torch

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


def _unflatten(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike) -> None:
    """Atomically replace the training checkpoint in `directory` (a crash leaves the previous one intact): any nest
    of dicts, lists, scalars and tensors, split into `state.safetensors` (tensors) and `state.json` (the structure)."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    skeleton = _flatten(state, tensors, "state")
    with atomic_path(directory, is_dir=True) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton))


def _recovered(directory: Path) -> bool:
    """Put back a checkpoint that a kill between `atomic_path`'s two renames left beside `directory`: the previous one
    was moved aside, so the new one was complete (it is taken; the previous one if the new is gone)."""
    for leftover in sorted(directory.parent.glob(f".{directory.name}.*")):
        if (leftover / ".previous").is_dir():
            newest = leftover / directory.name if (leftover / directory.name / "state.json").is_file() else leftover / ".previous"
            os.replace(newest, directory)
            shutil.rmtree(leftover, ignore_errors=True)
            return True
    return False


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The saved state, or None when no checkpoint exists; a damaged one is a DataError, never unpickled."""
    from metaflowlib.errors import DataError

    directory = Path(directory)
    if not (directory / "state.json").is_file() and not _recovered(directory):
        return None
    tensors = load_tensors(directory / "state.safetensors")
    try:
        return _unflatten(json.loads((directory / "state.json").read_text()), tensors)
    except (json.JSONDecodeError, KeyError) as error:
        raise DataError(f"checkpoint {directory} is damaged ({type(error).__name__}: {error}); delete it to start afresh") from None
