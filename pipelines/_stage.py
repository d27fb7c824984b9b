"""What every stage script shares: the project root, params, and one way to fail."""

from __future__ import annotations

import fnmatch
import sys
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


__all__ = ["ROOT", "PREPARED", "declared", "params", "method_key", "run_guarded"]
