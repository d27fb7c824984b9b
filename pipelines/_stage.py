"""What every stage script shares: the project root, params, one way to fail, and resumable checkpoints."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaflowlib.entry import run_guarded  # noqa: E402
from metaflowlib.config import Params, load_params  # noqa: E402

def params(**sections: type) -> Params:
    """params.yaml with the experiment sections this stage reads (e.g. `tta=TTAParams`) validated too."""
    return load_params(ROOT / "params.yaml", **sections)


@cache
def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def declared(stage: str, pattern: str, **variables: str) -> Path:
    """The one dep or output of `stage` in dvc.yaml that matches `pattern` (fnmatch), ${name} filled from
    `variables`, relative to the project root: dvc.yaml is the one place that spells a stage's paths."""
    body = _dvc_stages()[stage]
    body = body.get("do", body)
    entries = [next(iter(e)) if isinstance(e, dict) else e
               for section in ("deps", "outs", "metrics", "plots") for e in body.get(section, [])]
    for name, value in variables.items():
        entries = [e.replace(f"${{{name}}}", value) for e in entries]
    found = [e for e in entries if fnmatch.fnmatch(e, pattern)]
    if len(found) != 1:
        raise LookupError(f"dvc.yaml stage {stage!r} declares {len(found)} paths matching {pattern!r}: {found}")
    return Path(found[0])


PREPARED = ROOT / declared("prepare", "data/*")


def method_key() -> str:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {Path(sys.argv[0]).name} <method key from params.yaml methods>")
    return sys.argv[1]


@dataclass(frozen=True)
class Checkpoints:
    """`checkpoints/<name>/` of one training: the loop's checkpoint (`state/`), the MLflow run it logs to, and a
    fingerprint of what it trains. A rerun resumes both only when the fingerprint matches, and starts afresh
    otherwise; a finished stage removes them."""

    top: Path  # <project>/checkpoints
    name: str  # e.g. "<key>", "<key>/pretrain", "tta_source/<kind>"
    fingerprint: str

    @classmethod
    def of(cls, root: Path, name: str, trains: dict) -> Checkpoints:
        """`trains`: JSON of everything the result depends on (params, the data's and a start point's identity)."""
        digest = hashlib.sha256(json.dumps(trains, sort_keys=True).encode()).hexdigest()[:16]
        return cls(root / "checkpoints", name, digest)

    @property
    def directory(self) -> Path:
        return self.top / self.name

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def resume_run_id(self) -> str | None:
        """The MLflow run of a matching interrupted run, or None (and a clean slate) otherwise."""
        marker, run_file = self.directory / "fingerprint", self.directory / "mlflow_run_id"
        if marker.is_file() and run_file.is_file() and marker.read_text() == self.fingerprint:
            return run_file.read_text().strip()
        self.remove()
        return None

    def started(self, run_id: str, **kept: dict) -> None:
        """Record the run a rerun resumes into, and `kept` records a rerun must reuse rather than decide again
        (e.g. `precision`: a resumed training never switches precision mid-run), read back by `kept`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, record in kept.items():
            (self.directory / f"{name}.json").write_text(json.dumps(record))
        (self.directory / "mlflow_run_id").write_text(run_id)
        (self.directory / "fingerprint").write_text(self.fingerprint)

    def kept(self, name: str) -> dict | None:
        """The record `name` an interrupted run of this fingerprint kept (`started`), or None."""
        marker, path = self.directory / "fingerprint", self.directory / f"{name}.json"
        if marker.is_file() and path.is_file() and marker.read_text() == self.fingerprint:
            return json.loads(path.read_text())
        return None

    def remove(self) -> None:
        """The checkpoint (with any half-written one a kill left), and this directory's files; another training's
        checkpoints nested inside (e.g. `<key>/pretrain` in train@<key>'s `<key>`) stay."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.is_dir() and (path == self.state or path.name.startswith(f".{self.state.name}.")):
                shutil.rmtree(path, ignore_errors=True)
            elif not path.is_dir():
                path.unlink(missing_ok=True)
        directory = self.directory
        while directory != self.top and not any(directory.iterdir()):  # and empty parents, e.g. tta_source/
            directory.rmdir()
            directory = directory.parent


__all__ = ["ROOT", "PREPARED", "Checkpoints", "declared", "params", "method_key", "run_guarded"]
