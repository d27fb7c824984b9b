"""Progress of a running stage or command: lines that arrive when they are printed, and never 30 s of silence.

`dvc repro > log` makes stdout a file, which Python buffers in blocks: a stage's lines then reached
the log minutes late. `heartbeat` (entered by `entry.run_guarded`, which every stage and command runs
through) makes stdout and stderr line-buffered and, while the work runs, prints
`<name>: <phase> (<elapsed>)` whenever nothing was printed for `every` seconds. Code that works
for a while names what it is doing with `phase("scoring 5w1s, 1000 tasks")`; the training loop's
own progress lines count as output, so a training stage gets no heartbeat between them. A loop over
known work goes through `track(items, "scoring 5w1s")`: a bar on a terminal, and the phase
`scoring 5w1s 3/20` for the heartbeat's lines in a log.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TextIO, TypeVar

T = TypeVar("T")

EVERY_SECONDS = 30.0


class _Watched:
    """A text stream that records when it was last written to."""

    def __init__(self, stream: TextIO, clock: _Clock) -> None:
        self._stream, self._clock = stream, clock

    def write(self, text: str) -> int:
        self._clock.touch()
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _Clock:
    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.phase = "working"

    def touch(self) -> None:
        self.last = time.monotonic()


_current: _Clock | None = None


def phase(text: str) -> None:
    """Name what the running stage does now; the next heartbeat line says it. Outside a heartbeat: nothing."""
    if _current is not None:
        _current.phase = text


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items` showing how far it got: a bar on stderr when it is a terminal; otherwise the phase
    `<label> <i>/<total>`, which the heartbeat prints after 30 s of silence."""
    total = total if total is not None else (len(items) if isinstance(items, Sized) else None)
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=label, total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
        return
    for done, item in enumerate(items):
        phase(f"{label} {done}/{total}" if total is not None else f"{label} ({done} done)")
        yield item


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@contextlib.contextmanager
def heartbeat(name: str, every: float = EVERY_SECONDS) -> Iterator[None]:
    """Line-buffered stdout/stderr, and a line `<name>: <phase> (<elapsed>)` after every `every` s of silence."""
    global _current
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    clock, stdout, stderr = _Clock(), sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Watched(stdout, clock), _Watched(stderr, clock)
    previous, _current = _current, clock
    done = threading.Event()

    def beat() -> None:
        while not done.wait(min(every, max(0.05, every - (time.monotonic() - clock.last)))):
            now = time.monotonic()
            if now - clock.last >= every:
                print(f"{name}: {clock.phase} ({_elapsed(now - clock.start)})", flush=True)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sys.stdout, sys.stderr, _current = stdout, stderr, previous
