"""What every stage script shares: the project root, params, and one way to fail."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaflowlib.cli import run_guarded  # noqa: E402
from metaflowlib.config import Params, load_params  # noqa: E402

PREPARED = ROOT / "data" / "prepared"


def params() -> Params:
    return load_params(ROOT / "params.yaml")


def method_key() -> str:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {Path(sys.argv[0]).name} <method key from params.yaml methods>")
    return sys.argv[1]


__all__ = ["ROOT", "PREPARED", "params", "method_key", "run_guarded"]
