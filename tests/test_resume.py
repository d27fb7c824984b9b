"""A real training process killed with SIGKILL resumes into the same MLflow run and ends bitwise equal (meta-training,
and pre-training a feature map); SIGTERM stops it cleanly with a checkpoint and the run marked KILLED."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, load_stage, save_synthetic_prepared

EPISODES = 300
PRETRAIN = {"kind": "param_prediction", "hidden": 8, "ways": 5, "shots": 2, "queries": 3,  # 96 images in batches of 8:
            "pretrain": {"batch_size": 8, "budget": {"default": {"epochs": 8}}}}  # 96 steps, a checkpoint every 2


def make_project(root, methods: dict | None = None, train: dict | None = None):
    """A copy of the pipeline code with a small synthetic prepared dataset and an episode budget (`train`: more
    train.* params)."""
    shutil.copytree(ROOT / "pipelines", root / "pipelines")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")  # the stages find their paths there
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["methods"] = methods or {"protonet": {"kind": "protonet", "hidden": 16, "ways": 5, "shots": 2, "queries": 3,
                                                 "budget": {"default": {"episodes": EPISODES}}}}
    params["shift"]["methods"] = []
    params["optimizer"]["finetune"]["methods"] = []
    params["train"].update(val_every=50, checkpoint_every=2, progress="log",
                           validation={"ways": 5, "shots": 1, "queries": 3, "tasks": 20}, **(train or {}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    save_synthetic_prepared(root / "data" / "prepared", 12, 8)
    return root


def train(root, stage: str = "train", key: str = "protonet"):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # this checkout's library, not an install's
    env["OMP_NUM_THREADS"] = "1"  # tiny convolutions: threads only contend, more so with two runs side by side
    return subprocess.Popen([sys.executable, f"pipelines/{stage}.py", key], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(root, timeout=120, name="protonet"):
    state = root / "checkpoints" / name / "state" / "state.json"
    deadline = time.time() + timeout
    while not state.exists():
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def omega(root):
    return load_file(str(root / "models" / "protonet" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("straight"))
    process = train(root)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return root


def test_sigkill_then_rerun_resumes_into_the_same_run_bitwise(uninterrupted, tmp_path):
    root = make_project(tmp_path)
    process = train(root)
    wait_for_checkpoint(root)
    time.sleep(random.uniform(0, 0.2))  # a random moment after the first checkpoint
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    run_id = (root / "checkpoints" / "protonet" / "mlflow_run_id").read_text()
    assert not (root / "models" / "protonet").exists()
    shutil.rmtree(os.environ["METAFLOWLIB_CACHE_DIR"])  # the resumed run must keep the precision it started with, not measure

    resumed = train(root)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    record = yaml.safe_load((root / "runs" / "protonet" / "train.json").read_text())
    assert record["run_id"] == run_id and record["meta_train_episodes"] == EPISODES
    started = yaml.safe_load((uninterrupted / "runs" / "protonet" / "train.json").read_text())["precision"]
    assert started["source"] == "measured"  # precision and channels_last auto (params.yaml), timed on this CPU
    assert record["precision"] == {**started, "source": "resumed"}
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    tags = mlflow.get_run(run_id).data.tags
    mlflow.set_tracking_uri(None)
    assert (tags["precision"], tags["channels_last"]) == (started["precision"], str(started["channels_last"]).lower())
    expected, actual = omega(uninterrupted), omega(root)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] == actual[key]).all(), key
    assert not (root / "checkpoints" / "protonet").exists()  # a finished run leaves no checkpoint behind


def test_sigterm_stops_cleanly_with_a_checkpoint_and_a_killed_run(tmp_path):
    root = make_project(tmp_path)
    process = train(root)
    wait_for_checkpoint(root)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 143, out
    assert "interrupted at episode" in out and "rerun the same command to resume" in out
    run_id = (root / "checkpoints" / "protonet" / "mlflow_run_id").read_text()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    assert mlflow.get_run(run_id).info.status == "KILLED"
    mlflow.set_tracking_uri(None)
    from metaflowlib.artifacts import load_checkpoint

    state = load_checkpoint(root / "checkpoints" / "protonet" / "state")
    assert 0 < state["step"] < EPISODES
    assert not (root / "models" / "protonet").exists()


def test_sigkill_in_pretraining_then_rerun_resumes_into_the_same_run_bitwise(tmp_path):
    # both start at once: explicit precision, or each would time its step (and could choose differently)
    fixed = {"precision": "fp32", "channels_last": True}
    straight, root = (make_project(tmp_path / name, {"pp": PRETRAIN}, fixed) for name in ("straight", "killed"))
    reference, process = train(straight, "pretrain", "pp"), train(root, "pretrain", "pp")
    wait_for_checkpoint(root, name="pp/pretrain")
    time.sleep(random.uniform(0, 0.2))
    assert process.poll() is None, "pre-training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    run_id = (root / "checkpoints" / "pp" / "pretrain" / "mlflow_run_id").read_text()

    resumed = train(root, "pretrain", "pp")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    record = yaml.safe_load((root / "runs" / "pp" / "pretrain.json").read_text())
    assert record["run_id"] == run_id and record["pretrain_steps"] == 96
    assert record["precision"] == {"precision": "fp32", "channels_last": True, "source": "resumed", "rates": {}}
    reference_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_out
    expected = load_file(str(straight / "pretrained" / "pp" / "model.safetensors"))
    actual = load_file(str(root / "pretrained" / "pp" / "model.safetensors"))
    assert expected.keys() == actual.keys() and all((expected[k] == actual[k]).all() for k in expected)
    assert not (root / "checkpoints" / "pp").exists()


def test_checkpoints_resume_only_what_they_were_trained_for_and_leave_nested_ones(tmp_path):
    checkpoints = load_stage("train").Checkpoints  # pipelines/_stage.py, as the stages import it
    train = checkpoints.of(tmp_path, "pp", {"lr": 0.1})
    pretrain = checkpoints.of(tmp_path, "pp/pretrain", {"lr": 0.1})
    for each in (train, pretrain):
        each.started("run-id")
        each.state.mkdir()
        (each.directory / ".state.tmp123").mkdir()  # what a kill during a checkpoint write leaves
    assert train.resume_run_id() == "run-id"
    assert checkpoints.of(tmp_path, "pp", {"lr": 0.2}).resume_run_id() is None  # other params: afresh
    assert sorted(p.name for p in train.directory.iterdir()) == ["pretrain"]  # train@'s files gone, pretrain@'s kept
    assert pretrain.resume_run_id() == "run-id"
    pretrain.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"] and not any((tmp_path / "checkpoints").iterdir())
