"""The one training loop (`metaflowlib.loop`): budget, validation and the best state, logging, checkpoints and
resume, signals, and the minibatch stream."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from metaflowlib.errors import DataError, Interrupted
from metaflowlib.io import load_checkpoint, save_checkpoint
from metaflowlib.loop import Loop, Minibatches, restore_rng_states

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy:
    """A model, an optimizer and a data stream in miniature: w moves by each minibatch's data and by a draw from
    every global RNG, so a resume that lost any of their states ends elsewhere."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.data = torch.linspace(-1, 1, 10)  # the data set: the same whatever the seed
        self.w = torch.nn.Linear(1, 1)
        self.batches = Minibatches(10, 3, torch.Generator().manual_seed(seed))
        self.optimizer = torch.optim.Adam(self.w.parameters(), lr=0.1)

    def step(self) -> dict[str, float]:
        x = self.data[self.batches.next()].unsqueeze(1)
        noise = float(torch.rand(())) + float(np.random.random()) + random.random()
        loss = (self.w(x) - noise).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def validate(self) -> float:
        return -abs(float(self.w.weight.detach()) - 0.5) + float(torch.rand(()))  # draws too: validation's RNG use must resume

    def loop(self, **kwargs) -> Loop:
        settings = {"max_steps": 12, "state": {"w": self.w, "optimizer": self.optimizer, "batches": self.batches},
                    "validate": self.validate, "val_every": 4, "keep": self.w, "progress": "off"}
        return Loop(self.step, **{**settings, **kwargs})


def global_draws() -> tuple:
    return torch.rand(3), np.random.random(3), [random.random() for _ in range(3)]


def test_a_step_budget_logs_at_its_cadence_and_at_each_validation():
    toy, logged = Toy(), []
    result = toy.loop(max_steps=7, log=lambda metrics, step: logged.append((step, metrics)), log_every=3).run()
    assert result.steps == 7 and result.seconds > 0 and result.peak_memory_mb > 0
    assert [step for step, _ in logged] == [3, 4, 6, 7]  # every 3rd, the validation at 4, and the end (budget spent)
    assert [step for step, metrics in logged if "val_accuracy" in metrics] == [4, 7]
    assert result.history == [{"step": step, **metrics} for step, metrics in logged]


def test_a_seconds_budget_ends_after_the_step_that_spends_it():
    def slow() -> dict[str, float]:
        time.sleep(0.02)
        return {}

    result = Loop(slow, max_seconds=0.1, progress="off").run()
    assert result.seconds >= 0.1 and 5 <= result.steps <= 6


def test_the_best_validated_state_is_kept_and_returned():
    toy = Toy()
    scores, snapshots = iter([0.1, 0.9, 0.3]), {}

    def validate() -> float:
        score = next(scores)
        snapshots[score] = {k: v.clone() for k, v in toy.w.state_dict().items()}
        return score

    seen_best = []

    def on_validation() -> dict[str, float]:
        seen_best.append(loop.best_step)
        return {"extra": 1.0}

    loop = toy.loop(validate=validate, on_validation=on_validation)
    result = loop.run()
    assert result.best_score == 0.9 and result.best_step == 8
    assert seen_best == [4, 8, 8]  # on_validation runs after the best state is kept
    assert [row["step"] for row in result.history if "extra" in row] == [4, 8, 12]
    for key, value in toy.w.state_dict().items():
        assert torch.equal(value, snapshots[0.9][key]), key


def test_without_validation_the_last_state_stays():
    toy, states = Toy(), []

    def step() -> dict[str, float]:
        metrics = toy.step()
        states.append({k: v.clone() for k, v in toy.w.state_dict().items()})
        return metrics

    result = Loop(step, max_steps=5, state={"w": toy.w}, progress="off").run()
    assert result.best_score == -float("inf") and result.steps == len(result.history) == 5
    assert all(torch.equal(value, states[-1][key]) for key, value in toy.w.state_dict().items())


@pytest.mark.parametrize("stop_at", [3, 4, 12])  # mid-epoch; on a validation; on the last step (a no-op stop)
def test_an_interrupted_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, stop_at):
    straight = Toy()
    expected = straight.loop(checkpoint_dir=tmp_path / "straight").run()
    after_straight = global_draws()

    interrupted = Toy()
    step = interrupted.step

    def step_then_signal() -> dict[str, float]:
        if loop.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step `stop_at`: the loop stops after it
        return step()

    loop = interrupted.loop(checkpoint_dir=tmp_path / "ckpt")
    loop.train_step = step_then_signal
    if stop_at < 12:
        with pytest.raises(Interrupted, match=rf"interrupted at step {stop_at} by SIGTERM; checkpoint in .*ckpt; rerun") as stop:
            loop.run()
        assert stop.value.exit_code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the caller's again
    else:
        loop.run()

    resumed = Toy(seed=123)  # other seeds everywhere: only the checkpoint can restore the states
    result = resumed.loop(checkpoint_dir=tmp_path / "ckpt").run()
    assert result.steps == 12 and result.history == expected.history
    assert (result.best_score, result.best_step) == (expected.best_score, expected.best_step)
    for key, value in straight.w.state_dict().items():
        assert torch.equal(value, resumed.w.state_dict()[key]), key
    after_resumed = global_draws()
    assert torch.equal(after_straight[0], after_resumed[0]) and np.array_equal(after_straight[1], after_resumed[1])
    assert after_straight[2] == after_resumed[2]


def test_a_signal_without_a_checkpoint_directory_says_nothing_was_saved():
    def step() -> dict[str, float]:
        os.kill(os.getpid(), signal.SIGINT)
        return {}

    loop = Loop(step, max_steps=5, progress="off")
    with pytest.raises(Interrupted, match="interrupted at step 1 by SIGINT; no checkpoint directory was set, nothing saved"):
        loop.run()


def test_checkpoint_holds_every_rng_state_without_pickle(tmp_path):
    np.random.seed(7)
    np.random.standard_normal()  # numpy caches the second gaussian: that cache is state too
    random.seed(7)
    random.gauss(0, 1)
    Loop(dict, max_steps=2, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, progress="off").run()
    expected_numpy, expected_python = np.random.get_state(), random.getstate()
    np.random.seed(1)
    random.seed(1)
    restore_rng_states(load_checkpoint(tmp_path / "ckpt"))
    numpy_state = np.random.get_state()
    assert np.array_equal(numpy_state[1], expected_numpy[1]) and numpy_state[2:] == expected_numpy[2:]
    assert random.getstate() == expected_python
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["state.json", "state.safetensors"]


def test_a_checkpoint_of_another_training_is_refused(tmp_path):
    toy = Toy()
    toy.loop(checkpoint_dir=tmp_path / "ckpt").run()
    with pytest.raises(DataError, match=r"does not hold this training's state .*'other'.*delete it to start afresh"):
        Loop(toy.step, max_steps=3, state={"other": toy.w}, checkpoint_dir=tmp_path / "ckpt", progress="off").run()
    save_checkpoint({"episode": 3}, tmp_path / "old")  # the layout MetaTrainer wrote before the loop engine
    with pytest.raises(DataError, match="does not hold this training's state"):
        Loop(toy.step, max_steps=3, checkpoint_dir=tmp_path / "old", progress="off").run()


def test_progress_lines_and_resuming_are_printed(tmp_path, capsys):
    toy = Toy()
    toy.loop(max_steps=6, progress="log", report_every=3, show=("loss",), name="toy", checkpoint_dir=tmp_path / "c").run()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[:2] for line in lines] == [["toy", " step 3/6"], ["toy", " step 4/6"], ["toy", " step 6/6"]]
    assert "  loss " in lines[0] and "best" in lines[1] and "steps/s  ETA" in lines[2]
    toy.loop(max_steps=6, progress="log", checkpoint_dir=tmp_path / "c").run()  # spent: resumes and stops at once
    assert capsys.readouterr().out.startswith(f"resuming from {tmp_path / 'c'} at step 6")


@pytest.mark.parametrize("settings, message", [
    ({"max_steps": None}, "a budget needs max_steps or max_seconds"),
    ({"keep": None}, "validate and keep go together"),
    ({"validate": None}, "validate and keep go together"),
    ({"val_every": 0}, "every cadence must be at least 1 step"),
    ({"progress": "loud"}, "progress must be one of"),
])
def test_impossible_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Toy().loop(**settings)


def test_minibatches_cover_each_epoch_once_and_resume_mid_epoch():
    batches = Minibatches(7, 3, torch.Generator().manual_seed(0))
    epoch = [batches.next() for _ in range(len(batches))]
    assert len(batches) == 3 and [len(b) for b in epoch] == [3, 3, 1] and batches.epoch_ended
    assert sorted(torch.cat(epoch).tolist()) == list(range(7))
    reference = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat(epoch), reference)  # one randperm per epoch, the order the trainings drew before
    batches.next()
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batches.state_dict().items()}
    rest = [batches.next() for _ in range(4)]
    again = Minibatches(7, 3, torch.Generator().manual_seed(99))
    again.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(rest, [again.next() for _ in range(4)]))


@pytest.mark.parametrize("new_one_written", [True, False])
def test_a_kill_between_the_checkpoint_renames_loses_nothing(tmp_path, new_one_written) -> None:
    """`save_checkpoint` replaces a directory in two renames (the old one aside, the new one in); a SIGKILL between
    them leaves no `state/` but both beside it. Loading takes the new one back (or the old one if the new is gone)."""
    state = tmp_path / "state"
    save_checkpoint({"step": 1, "w": torch.ones(2)}, state)
    staging = tmp_path / ".state.abc123"
    save_checkpoint({"step": 2, "w": torch.full((2,), 2.0)}, staging / "state")
    os.replace(state, staging / ".previous")  # the first rename happened, the kill came before the second
    if not new_one_written:
        shutil.rmtree(staging / "state")
    loaded = load_checkpoint(state)
    assert loaded["step"] == (2 if new_one_written else 1) and torch.equal(loaded["w"], torch.full((2,), 2.0 if new_one_written else 1.0))
    assert not staging.exists() and (state / "state.json").is_file()


def test_tensor_metrics_are_read_back_at_the_log_cadence_after_the_guard(tmp_path):
    toy, guarded = Toy(), []

    def step() -> dict[str, torch.Tensor]:
        toy.step()
        return {"loss": torch.tensor(loop.step + 0.5), "accuracy": torch.tensor(0.25, dtype=torch.float64), "lr": 0.1}

    def guard() -> None:
        guarded.append(loop.step)
        if loop.step == 9:
            raise RuntimeError("diverged")

    loop = toy.loop(log_every=3, val_every=4, checkpoint_every=5, max_steps=10, checkpoint_dir=tmp_path / "ckpt")
    loop.train_step, loop.guard = step, guard
    with pytest.raises(RuntimeError, match="diverged"):
        loop.run()
    assert guarded == [3, 4, 5, 6, 8, 9]  # once per step that logs, validates or saves: before any of it
    assert [row["step"] for row in loop.history] == [3, 4, 6, 8]
    assert loop.history[0] == {"step": 3, "loss": 2.5, "accuracy": 0.25, "lr": 0.1}
    assert all(type(row["loss"]) is float for row in loop.history)
    assert load_checkpoint(tmp_path / "ckpt")["step"] == 5 and loop.checked == 8  # step 9's guard refused: nothing saved
