"""bench/paper_run.py: a paper run continued over windows by separate processes ends bitwise where one uninterrupted
process ends, and is scored by the pipeline's protocol; the committed plan resolves from params.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from metaflowlib_bench.cases import write_pools  # noqa: E402

SPEC = {
    "name": "protonet-tiny", "method_key": "protonet", "kind": "protonet",
    "model": {"hidden": 8, "image_size": 28, "in_channels": 1},
    "ways": 3, "shots": 1, "queries": 2, "tasks_per_step": 1, "episodes": 7, "val_every": 3, "checkpoint_every": 2,
    "meta_optimizer": {"name": "adam", "lr": 0.01, "schedule": "step", "decay_every": 4, "decay": 0.5, "grad_clip": None},
    "validation": {"ways": 3, "shots": 1, "queries": 2, "tasks": 4},
    "evaluate": {"settings": {"3w1s": [3, 1]}, "tasks": 6, "queries": 2, "seed": 5, "batch_tasks": 3, "timing_tasks": 2},
    "seed": 0, "published": {"3w1s": 40.0}, "source": "test",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, classes in (("train", 8), ("val", 5), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (classes * 5, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.repeat(np.arange(classes), 5)
    write_pools(root / "pools.npz", arrays, "synthetic")
    fomaml = {**SPEC, "name": "fomaml-tiny", "method_key": "fomaml", "kind": "fomaml", "tasks_per_step": 2, "episodes": 3,
              "model": {"hidden": 4, "image_size": 28, "in_channels": 1, "ways": 3, "inner_steps": 1, "inner_lr": 0.1}}
    (root / "plan.json").write_text(json.dumps({"runs": [SPEC, fomaml]}))
    return root


def paper_run(root: Path, runs: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "paper_run.py"), "--plan", str(root / "plan.json"),
                             "--pools", str(root / "pools.npz"), "--runs-dir", str(root / runs), "--device", "cpu",
                             "--precision", "fp32", *args], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_two_windows_end_bitwise_where_one_ends_and_are_scored(setup):
    root = setup
    first = paper_run(root, "windows", "--segment-episodes", "4")
    record = json.loads((root / "windows" / "protonet-tiny" / "run.json").read_text())
    assert record["status"] == "training" and (root / "windows" / "protonet-tiny" / "checkpoint").is_dir()
    assert "protonet-tiny: episode 4/7" in first.stdout and "left: protonet-tiny, fomaml-tiny" in first.stdout

    second = paper_run(root, "windows")
    assert "resuming from" in second.stdout and "left: none" in second.stdout
    once = paper_run(root, "once")
    for name in ("protonet-tiny", "fomaml-tiny"):
        resumed, single = root / "windows" / name, root / "once" / name
        assert (resumed / "omega" / "model.safetensors").read_bytes() == (single / "omega" / "model.safetensors").read_bytes()
        assert not (resumed / "checkpoint").exists()
        scored = json.loads((resumed / "evaluation.json").read_text())
        assert scored["settings"] == json.loads((single / "evaluation.json").read_text())["settings"]
        assert len(scored["task_accuracies"]["3w1s"]) == 6
        assert scored["reached_published"]["3w1s"] == (100 * (scored["settings"]["3w1s"]["accuracy"] + scored["settings"]["3w1s"]["ci95"]) >= 40)
    record = json.loads((root / "windows" / "protonet-tiny" / "run.json").read_text())
    assert record["status"] == "finished" and record["mixed_cards"] is False
    assert [(s["episodes_from"], s["episodes_to"]) for s in record["segments"]] == [(0, 4), (4, 7)]
    assert all(s["device_type"] == "cpu" and s["precision"] == "fp32" for s in record["segments"])
    curve = (root / "windows" / "protonet-tiny" / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("episode,seconds,train_loss")
    assert [row.split(",")[0] for row in curve[1:] if row.split(",")[4]] == ["3", "6", "7"]  # validated rows, seconds kept
    assert "paper 40.0" in once.stdout
    reached = json.loads((root / "windows" / "protonet-tiny" / "evaluation.json").read_text())["seconds_to_published_on_validation"]
    validated = {int(r.split(",")[0]): float(r.split(",")[4]) for r in curve[1:] if r.split(",")[4]}
    first = next((e for e, accuracy in sorted(validated.items()) if 100 * accuracy >= 40), None)
    assert set(reached) == {"3w1s"} and (reached["3w1s"] is None) == (first is None)


def test_a_changed_plan_entry_is_refused_not_mixed_in(tmp_path):
    import paper_run

    from metaflowlib.errors import DataError

    paper_run.PaperRun(SPEC, tmp_path).save()  # a run started from this entry
    assert paper_run.PaperRun(SPEC, tmp_path).status == "training"
    changed = {**SPEC, "meta_optimizer": {**SPEC["meta_optimizer"], "lr": 0.5}}
    with pytest.raises(DataError, match="was started from another plan entry for protonet-tiny"):
        paper_run.PaperRun(changed, tmp_path)


def test_the_committed_plan_is_params_yaml_resolved():
    """The plan a GPU window reads is what `bench/paper_plan.py` makes of today's params.yaml (rerun it and commit)."""
    import paper_plan

    committed = json.loads((ROOT / "bench" / "paper_runs" / "plan.json").read_text())
    assert committed == json.loads(json.dumps(paper_plan.plan(ROOT / "params.yaml")))
    names = [run["name"] for run in committed["runs"]]
    assert names[:3] == ["protonet-1shot", "protonet-5shot", "maml-5w1s"]
    assert all(run["estimate_minutes_h100"] > 0 for run in committed["runs"])


def test_the_window_script_carries_the_state_in_and_out_through_out(setup, tmp_path):
    """`bash bench/paper_run.sh`: the committed state goes to $OUT/paper_runs, is continued there, and comes back."""
    project = tmp_path / "checkout"
    (project / "bench" / "results" / "paper_runs").mkdir(parents=True)
    (project / "bench" / "paper_run.sh").write_bytes((ROOT / "bench" / "paper_run.sh").read_bytes())
    (project / "bench" / "paper_run.py").write_bytes((ROOT / "bench" / "paper_run.py").read_bytes())
    (project / "metaflowlib").symlink_to(ROOT / "metaflowlib")
    (project / "bench" / "metaflowlib_bench").symlink_to(ROOT / "bench" / "metaflowlib_bench")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "ONLY": "protonet-tiny",
           "PAPER_ARGS": f"--plan {setup / 'plan.json'} --pools {setup / 'pools.npz'} --precision fp32 --segment-episodes 2"}
    done = subprocess.run(["bash", "bench/paper_run.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "paper_run exit 0" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((out / "paper_runs" / "protonet-tiny" / "run.json").read_text())
    assert record["segments"][0]["episodes_to"] == 2 and (out / "paper_run.log").is_file()
    assert not any((project / "bench" / "results" / "paper_runs").iterdir())  # the checkout is only read
