import dataclasses
import os
import random
import signal

import numpy as np
import pytest
import torch

from metaflowlib.episodes import EpisodeSampler
from metaflowlib.errors import DivergenceError, Interrupted
from metaflowlib.io import load_checkpoint
from metaflowlib.methods import ProtoNet
from metaflowlib.train import MetaTrainer, build_meta_optimizer


def make_trainer(pool, *, episodes, checkpoint_dir=None, checkpoint_every=100, validate=None, seed=0, optimizer="adam",
                 on_device=None):
    torch.manual_seed(seed)
    method = ProtoNet(hidden=8)
    optimizer, scheduler = build_meta_optimizer(method, optimizer, 1e-2, 3, 0.5)
    sampler = EpisodeSampler(pool, 5, 1, 2, tasks=2, seed=seed, on_device=on_device)
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


def test_non_finite_loss_stops_at_the_first_check(tiny_pool, tmp_path):
    trainer = make_trainer(tiny_pool, episodes=5, checkpoint_dir=tmp_path / "ckpt")
    with torch.no_grad():
        trainer.method.embedding.blocks[0].weight.fill_(float("nan"))
    with pytest.raises(DivergenceError, match=r"episodes 1-2 .*no omega after episode 0 .*last good checkpoint"):
        trainer.run()  # the first check: before the validation at episode 2


class PoisonedFrom:
    """The sampler's task stream, with NaN images from draw `first` on."""

    def __init__(self, sampler, first):
        self.sampler, self.first, self.draws = sampler, first, 0

    def __next__(self):
        self.draws += 1
        episode = next(self.sampler)
        return episode if self.draws < self.first else dataclasses.replace(episode, query_x=episode.query_x * float("nan"))

    def state(self):
        return self.sampler.state()

    def load_state(self, state):
        self.sampler.load_state(state)


def test_a_divergence_names_its_window_and_leaves_the_last_checkpoint_finite(tiny_pool, tmp_path):
    trainer = make_trainer(tiny_pool, episodes=8, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    trainer.sampler = PoisonedFrom(trainer.sampler, first=3)
    with pytest.raises(DivergenceError, match=r"in episodes 3-4 .*no omega after episode 2 "):
        trainer.run()
    assert not all(torch.isfinite(p).all() for p in trainer.method.parameters())  # the window's omega, never saved
    saved = load_checkpoint(tmp_path / "ckpt")
    assert saved["step"] == 2 and all(torch.isfinite(t).all() for t in saved["state"]["omega"].values())
    assert all(torch.isfinite(t).all() for t in saved["best"].values())


def test_a_meta_step_reads_nothing_back_from_the_device(tiny_pool, monkeypatch):
    """The metrics stay tensors and the guard a flag: no float(), bool(), .item() or .tolist() from Python in a step
    (plain SGD: Adam's CPU kernels read their step count with .item())."""
    trainer = make_trainer(tiny_pool, episodes=3, optimizer="sgd", on_device=True)
    trainer.meta_step()  # the first draw reads the class layout (on the host) and copies it to the device once

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync in the step")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    metrics = [trainer.meta_step() for _ in range(3)]
    monkeypatch.undo()
    assert all(isinstance(m["train_loss"], torch.Tensor) and m["train_loss"].ndim == 0 for m in metrics)
    assert bool(trainer.finite)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize("kind", ["protonet", "maml"])
def test_on_cuda_a_meta_step_never_syncs(tiny_pool, kind):
    from metaflowlib.episodes import TaskPool
    from metaflowlib.methods import build_method

    pool = TaskPool(tiny_pool.examples.cuda(), torch.repeat_interleave(tiny_pool.classes, tiny_pool.counts), "train")
    torch.manual_seed(0)
    method = (ProtoNet(hidden=8) if kind == "protonet" else build_method("maml", ways=5, hidden=8, vectorize="vmap")).cuda()
    optimizer, scheduler = build_meta_optimizer(method, "adam", 1e-3, 10, 1.0)
    assert optimizer.defaults["fused"]
    trainer = MetaTrainer(method, EpisodeSampler(pool, 5, 1, 2, tasks=4), optimizer, scheduler, validate=lambda m: 0.0,
                          val_every=10, max_episodes=10, max_seconds=None, progress="off")
    trainer.meta_step()  # warm-up: the sampler copies the class layout once, cuDNN picks its kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.meta_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(trainer.finite)


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
