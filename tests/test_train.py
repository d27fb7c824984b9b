import os
import random
import signal

import numpy as np
import pytest
import torch

from metaflowlib.episodes import EpisodeSampler
from metaflowlib.errors import DivergenceError, Interrupted
from metaflowlib.methods import ProtoNet
from metaflowlib.train import MetaTrainer, build_meta_optimizer


def make_trainer(pool, *, episodes, checkpoint_dir=None, checkpoint_every=100, validate=None, seed=0):
    torch.manual_seed(seed)
    method = ProtoNet(hidden=8)
    optimizer, scheduler = build_meta_optimizer(method, "adam", 1e-2, 3, 0.5)
    sampler = EpisodeSampler(pool, 5, 1, 2, tasks=2, seed=seed)
    validate = validate or (lambda m: float(-sum(p.detach().abs().sum() for p in m.parameters())))
    return MetaTrainer(method, sampler, optimizer, scheduler, validate=validate, val_every=2, max_episodes=episodes,
                       max_seconds=None, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress="off")


def test_budget_logging_and_lr_decay(tiny_pool):
    logged = []
    trainer = make_trainer(tiny_pool, episodes=7)
    trainer.log = lambda metrics, step: logged.append((step, metrics))
    trainer.log_every = 1
    result = trainer.run()
    assert result.episodes == 7 and len(logged) == 7
    assert [s for s, m in logged if "val_accuracy" in m] == [2, 4, 6, 7]
    assert logged[-1][1]["lr"] == pytest.approx(1e-2 * 0.5**2)  # StepLR halves every 3 meta-steps
    assert result.peak_memory_mb > 0 and result.seconds > 0


def test_best_omega_on_validation_is_returned(tiny_pool):
    scores = iter([0.1, 0.9, 0.2, 0.3])
    snapshots = {}

    def validate(method):
        score = next(scores)
        snapshots[score] = {k: v.clone() for k, v in method.state_dict().items()}
        return score

    trainer = make_trainer(tiny_pool, episodes=8, validate=validate)
    result = trainer.run()
    assert result.best_val_accuracy == 0.9 and result.best_episode == 4
    for key, value in trainer.method.state_dict().items():
        assert torch.equal(value, snapshots[0.9][key]), key


def test_resumed_run_ends_bitwise_equal_to_uninterrupted(tiny_pool, tmp_path):
    def validate(method):  # draws from every global RNG, so a resume that lost one would score differently
        return float(torch.rand(())) + float(np.random.random()) + random.random()

    def seeded(seed, **kwargs):
        np.random.seed(seed)
        random.seed(seed)
        return make_trainer(tiny_pool, episodes=8, validate=validate, seed=seed, **kwargs)

    straight = seeded(0)
    straight.run()
    after_straight = (torch.rand(3), np.random.random(3), [random.random() for _ in range(3)])

    interrupted = seeded(0, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=100)

    def validate_then_stop(method):  # a SIGTERM arrives during the first validation (episode 2)
        os.kill(os.getpid(), signal.SIGTERM)
        return validate(method)

    interrupted.validate = validate_then_stop
    with pytest.raises(Interrupted, match="interrupted at episode 2"):
        interrupted.run()
    resumed = seeded(123, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=100)  # other seeds: only the checkpoint can restore them
    result = resumed.run()
    assert result.episodes == 8
    for key, value in straight.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in straight.history]
    after_resumed = (torch.rand(3), np.random.random(3), [random.random() for _ in range(3)])
    assert torch.equal(after_straight[0], after_resumed[0])
    assert np.array_equal(after_straight[1], after_resumed[1]) and after_straight[2] == after_resumed[2]


def test_non_finite_loss_stops_with_the_step(tiny_pool, tmp_path):
    trainer = make_trainer(tiny_pool, episodes=5, checkpoint_dir=tmp_path / "ckpt")
    with torch.no_grad():
        trainer.method.embedding.blocks[0].weight.fill_(float("nan"))
    with pytest.raises(DivergenceError, match=r"episode 1 .*last good checkpoint"):
        trainer.run()


def test_budget_is_required(tiny_pool):
    method = ProtoNet(hidden=4)
    optimizer, scheduler = build_meta_optimizer(method, "sgd", 0.1, 10, 1.0)
    with pytest.raises(ValueError, match="budget"):
        MetaTrainer(method, EpisodeSampler(tiny_pool, 2, 1, 1), optimizer, scheduler, validate=lambda m: 0.0,
                    val_every=1, max_episodes=None, max_seconds=None)


def test_diagnostics_ride_along_with_each_validation_in_training_mode(tiny_pool):
    modes = []

    def diagnose(method):
        modes.append(method.training)
        return {"inner_grad_norm": 0.5}

    trainer = make_trainer(tiny_pool, episodes=5)
    trainer.diagnose = diagnose
    trainer.log_every = 1
    result = trainer.run()
    rows = [row for row in result.history if "val_accuracy" in row]
    assert [row["episode"] for row in rows] == [2, 4, 5] and all(row["inner_grad_norm"] == 0.5 for row in rows)
    assert all("inner_grad_norm" not in row for row in result.history if "val_accuracy" not in row)
    assert modes == [True, True, True]
