"""How every stage and command runs: a quiet environment, one-line errors, exit codes, signals, a heartbeat.

Below tracking and the registry (a stage that neither tracks nor registers, like `prepare`, depends on
this file and `progress.py` alone).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from metaflowlib.errors import Interrupted, MetaflowError
from metaflowlib.progress import heartbeat

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # an unreachable server fails now, not after minutes of retries
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


def quiet_environment() -> None:
    """No telemetry, no retry storms, no progress bars or hint nags from MLflow in stage logs."""
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)


def _terminated(number: int, frame: object) -> None:
    raise Interrupted(f"stopped by {signal.Signals(number).name}", number)


def run_guarded(main: Callable[[], None]) -> None:
    """Run a command or stage: a MetaflowError becomes a one-line message and exit code 2 (128 + signal if interrupted);
    its output is line-buffered, with a line naming its phase after 30 s of silence (metaflowlib.progress).

    SIGTERM unwinds like Ctrl-C, so an open MLflow run is ended (FAILED) instead of
    being left RUNNING; the training loop installs its own handler to checkpoint first.
    """
    quiet_environment()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with heartbeat(_name()):
            main()
    except MetaflowError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(getattr(error, "exit_code", 2)) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:  # a command run in-process (tests, a notebook) leaves the caller's handler as it was
        signal.signal(signal.SIGTERM, previous)


def _name() -> str:
    """How progress lines name what runs: `pipelines/evaluate.py protonet` -> 'evaluate@protonet'."""
    stem = Path(sys.argv[0]).stem
    return f"{stem}@{'-'.join(sys.argv[1:])}" if len(sys.argv) > 1 and stem != "metaflowlib" else stem
