"""Stage output arrives as it is printed, and a long silent step still says what it is doing (issue 18)."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import ROOT

from metaflowlib import progress


def test_silence_gets_a_line_naming_the_phase_and_the_elapsed_time(capsys):
    with progress.heartbeat("evaluate@protonet", every=0.2):
        progress.phase("scoring 5w1s, 1000 tasks")
        time.sleep(0.75)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and set(lines) == {"evaluate@protonet: scoring 5w1s, 1000 tasks (0s)"}, lines


def test_no_heartbeat_while_the_work_prints_and_streams_are_restored_after(capsys):
    stdout = sys.stdout
    with progress.heartbeat("train@maml", every=0.3):
        for step in range(12):
            print(f"episode {step}")
            time.sleep(0.05)
    assert sys.stdout is stdout
    progress.phase("outside any heartbeat: ignored")
    assert capsys.readouterr().out.splitlines() == [f"episode {step}" for step in range(12)]


def test_a_stage_writing_to_a_file_shows_each_line_before_it_ends(tmp_path):
    """`dvc repro > log`: stdout is a file, which Python would buffer in blocks until the stage ends."""
    script = tmp_path / "stage.py"
    script.write_text(
        f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nfrom metaflowlib.entry import run_guarded\n"
        "def main():\n    print('stage: loaded the test split')\n    time.sleep(30)\n"
        "run_guarded(main)\n")
    log = tmp_path / "log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, str(script)], stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "stage: loaded the test split" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.read_text() == "stage: loaded the test split\n" and process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_a_tracked_loop_names_how_far_it_got(capsys):
    """In a log (stderr not a terminal) each step of a tracked loop becomes the phase the heartbeat prints."""
    seen = []
    with progress.heartbeat("evaluate@protonet", every=0.2):
        for i in progress.track(range(3), "scoring 5-way 1-shot"):
            seen.append(progress._current.phase)
            if i == 1:
                time.sleep(0.35)
    assert seen == ["scoring 5-way 1-shot 0/3", "scoring 5-way 1-shot 1/3", "scoring 5-way 1-shot 2/3"]
    assert "evaluate@protonet: scoring 5-way 1-shot 1/3 (0s)" in capsys.readouterr().out
