"""Pre-training, the learned optimizer's meta-training and the TTA classifier's training, killed with SIGKILL at a
random moment and rerun, end with the weights of an uninterrupted run, bit for bit (tests/test_resume.py does the
same for meta-training through its stage).

Each case runs its library function the way its stage does, on tiny data, in a fresh process (this file run as
a script) that checkpoints after every step.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, class_images
from safetensors.torch import load_file, save_file

CASES = {"pretrain": 192, "learned_optimizer": 80, "tta_classifier": 200}  # steps of each run


def pretrain(checkpoint_dir: Path) -> torch.nn.Module:
    """pretrain@: a cosine ProtoNet's feature map, 24 epochs of 8 steps, validated after each epoch."""
    from metaflowlib.data.preprocess import to_model_input
    from metaflowlib.episodes import TaskPool
    from metaflowlib.evaluate import embed_pool, evaluate_setting
    from metaflowlib.methods import ProtoNet
    from metaflowlib.models import conv4_output_dim
    from metaflowlib.pretrain import pretrain_feature_map

    images, labels = class_images(12, 10)
    pool = TaskPool(to_model_input(images, 28), torch.from_numpy(labels), name="tiny")
    embedding = ProtoNet(hidden=8, distance="cosine").to(memory_format=torch.channels_last)

    def validate() -> float:
        return evaluate_setting(embedding, pool, embed_pool(embedding, pool, None), 5, 1, 3, 4, 1, 4, None).accuracy

    pretrain_feature_map(embedding.embedding, pool, dim=conv4_output_dim(28, 8), batch_size=16, lr=3e-3, scale=10.0,
                         max_epochs=24, max_seconds=None, validate=validate, seed=0, log_every=1,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=1)
    return embedding


def learned_optimizer(checkpoint_dir: Path) -> torch.nn.Module:
    """optimizer_train: 80 unrolls of 5 steps over horizons of 20 (a task seed drawn every 4th) on MLP optimizees."""
    from metaflowlib.learned_optimizer import (
        LSTMOptimizerNet,
        classifier_task,
        meta_train_optimizer,
        synthetic_images,
    )

    x, y = synthetic_images(ways=3, per_class=8, seed=0)
    net = LSTMOptimizerNet(hidden_size=8)
    meta_train_optimizer(net, lambda seed: classifier_task("mlp", x, y, seed=seed, batch_size=8, hidden=4), steps=80,
                         unroll=5, horizon=20, lr=3e-3, seed=0, log_every=10, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=1, progress=True)
    return net


def tta_classifier(checkpoint_dir: Path) -> torch.nn.Module:
    """tta_source: the TTT twin (main + rotation loss), 40 epochs of 5 minibatches."""
    from metaflowlib.tta.classifier import build_classifier, train_classifier

    images, labels = class_images(10, 8, seed=5)
    model = build_classifier("ttt", num_classes=10, image_size=28, hidden=4).to(memory_format=torch.channels_last)
    train_classifier(model, "ttt", images, labels, epochs=40, batch_size=16, lr=1e-3, seed=0, device=torch.device("cpu"),
                     channels_last=True, checkpoint_dir=checkpoint_dir, checkpoint_every=1, progress=True)
    return model


def worker(case: str, out: Path) -> None:
    from metaflowlib.runtime import seed_everything

    torch.set_num_threads(1)
    seed_everything(0)
    model = {"pretrain": pretrain, "learned_optimizer": learned_optimizer, "tta_classifier": tta_classifier}[case](out / "ckpt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))


def start(case: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, case, str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    return out


@pytest.mark.parametrize("case", CASES)
def test_sigkill_then_rerun_ends_bitwise_equal(case, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = start(case, straight)
    process = start(case, killed)
    deadline = time.time() + 60
    while not (killed / "ckpt" / "state.json").exists():
        assert time.time() < deadline and process.poll() is None, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.5))  # a random moment after the first checkpoint
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert not (killed / "weights.safetensors").exists()

    out = finish(start(case, killed))
    resumed_at = re.search(r"resuming from .* at step (\d+)", out)
    assert resumed_at and 0 < int(resumed_at.group(1)) < CASES[case], out
    finish(reference)
    expected, actual = load_file(str(straight / "weights.safetensors")), load_file(str(killed / "weights.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
