"""The learned LSTM optimizer (Andrychowicz et al. 2016): preprocessing, updates, files, meta-training guards."""

from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from metaflowlib.errors import DivergenceError, MetaflowError
from metaflowlib.methods.inner_optimizers import SGD, Adam
from metaflowlib.learned_optimizer import (
    LearnedOptimizer,
    LSTMOptimizerNet,
    OptimizeeTask,
    classifier_task,
    load_optimizer,
    meta_train_optimizer,
    preprocess_gradient,
    quadratic_task,
    run_optimizee,
    save_optimizer,
    synthetic_images,
)


def expected_preprocessing(g: float, p: float = 10.0) -> tuple[float, float]:
    if abs(g) >= math.exp(-p):
        return math.log(abs(g)) / p, math.copysign(1.0, g)
    return -1.0, math.exp(p) * g


def test_preprocessing_matches_appendix_a():
    values = [3.0, -3.0, 1.0, -0.5, 1e-3, -1e-3, 1e4, math.exp(-10), 2e-5, -2e-5, 1e-12, 0.0]
    g = torch.tensor(values, dtype=torch.float64)
    out = preprocess_gradient(g)
    assert out.shape == (len(values), 2)
    expected = torch.tensor([expected_preprocessing(v) for v in values], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    # |g| < e^-10: the linear branch keeps sign and size; zero maps to (-1, 0)
    assert out[8].tolist() == pytest.approx([-1.0, math.exp(10) * 2e-5])
    assert out[9, 1] < 0
    assert out[-1].tolist() == [-1.0, 0.0]
    assert preprocess_gradient(torch.zeros(3, 4)).shape == (3, 4, 2)


@pytest.fixture(scope="module")
def trained_net() -> LSTMOptimizerNet:
    torch.manual_seed(0)
    net = LSTMOptimizerNet()
    meta_train_optimizer(net, quadratic_task, steps=40, unroll=10, horizon=50, lr=3e-3, seed=0)
    return net


def test_meta_trained_optimizer_steps_downhill_on_a_held_out_quadratic(trained_net):
    for seed in (1000, 1001, 1002):
        task = quadratic_task(seed)
        theta = torch.nn.Parameter(task.params["theta"].clone())
        opt = LearnedOptimizer([theta], trained_net)
        opt.zero_grad()
        before = task.loss({"theta": theta}, 0)
        before.backward()
        opt.step()
        after = task.loss({"theta": theta.detach()}, 1)
        assert float(after) < float(before.detach()), seed


def test_meta_training_lowers_the_loss_reached_over_the_horizon(trained_net):
    task = quadratic_task(2024)
    torch.manual_seed(1)
    untrained = LSTMOptimizerNet()
    assert run_optimizee(task, trained_net, 50)[-1] < run_optimizee(task, untrained, 50)[-1]


def test_functional_step_is_differentiable_in_the_lstm_weights():
    torch.manual_seed(0)
    net = LSTMOptimizerNet()
    params = {"w": torch.randn(3, 4, requires_grad=True), "b": torch.randn(4, requires_grad=True)}
    grads = {"w": torch.randn(3, 4), "b": torch.randn(4)}  # constants, as meta-training feeds them
    state = net.init_state(params)
    for _ in range(2):
        params, state = net.step(params, grads, state)
    loss = sum(p.pow(2).sum() for p in params.values())
    meta_grads = torch.autograd.grad(loss, list(net.parameters()))
    assert all(torch.isfinite(g).all() for g in meta_grads)
    assert sum(float(g.abs().sum()) for g in meta_grads) > 0
    assert params["w"].shape == (3, 4) and params["b"].shape == (4,)


def test_functional_step_runs_under_vmap():
    """aten::lstm_cell has no vmap batching rule (torch 2.13); MAML's inner loop maps tasks with vmap on CUDA."""
    torch.manual_seed(0)
    net = LSTMOptimizerNet()
    params = {"w": torch.randn(3, 4)}

    def two_steps(g: torch.Tensor) -> torch.Tensor:
        p, state = params, net.init_state(params)
        for _ in range(2):
            p, state = net.step(p, {"w": g}, state)
        return p["w"]

    grads = torch.randn(5, 3, 4)
    torch.testing.assert_close(torch.func.vmap(two_steps)(grads), torch.stack([two_steps(g) for g in grads]))


def test_torch_optimizer_matches_the_functional_step():
    torch.manual_seed(0)
    net = LSTMOptimizerNet()
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))
    grads = [{"w": torch.randn(3, 4), "b": torch.randn(4)} for _ in range(3)]
    params = {"w": w.detach().clone(), "b": b.detach().clone()}
    state = net.init_state(params)
    opt = LearnedOptimizer([w, b], net)
    with torch.no_grad():
        for g in grads:
            params, state = net.step(params, g, state)
            w.grad, b.grad = g["w"].clone(), g["b"].clone()
            opt.step()
    torch.testing.assert_close(w.detach(), params["w"])
    torch.testing.assert_close(b.detach(), params["b"])


def test_state_dict_round_trip_gives_identical_steps():
    torch.manual_seed(0)
    net = LSTMOptimizerNet()
    grads = [torch.randn(5, 3) for _ in range(4)]
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = LearnedOptimizer([p], net)
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    saved, saved_p = copy.deepcopy(opt.state_dict()), p.detach().clone()  # state_dict aliases live tensors
    for g in grads[2:]:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(saved_p)
    restored = LearnedOptimizer([q], net)
    restored.load_state_dict(saved)
    for g in grads[2:]:
        q.grad = g.clone()
        restored.step()
    assert torch.equal(p.detach(), q.detach())


def test_save_load_gives_identical_outputs(tmp_path, trained_net):
    directory = save_optimizer(trained_net, tmp_path / "optimizer")
    assert sorted(f.name for f in directory.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_optimizer(directory)
    assert loaded.config() == trained_net.config()
    g = torch.randn(50)
    with torch.no_grad():
        out, state = trained_net(g, trained_net.zero_state(50))
        out2, state2 = loaded(g, loaded.zero_state(50))
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(state.h, state2.h))


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_load_refuses_a_pickle_named_like_the_weights(tmp_path):
    directory = save_optimizer(LSTMOptimizerNet(), tmp_path / "optimizer")
    marker = tmp_path / "unpickled"
    (directory / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(MetaflowError, match="not a valid safetensors file"):
        load_optimizer(directory)
    assert not marker.exists()


def test_load_refuses_a_config_that_does_not_match_the_weights(tmp_path):
    directory = save_optimizer(LSTMOptimizerNet(hidden_size=20), tmp_path / "optimizer")
    config = json.loads((directory / "config.json").read_text())
    config["config"]["hidden_size"] = 8
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(MetaflowError, match="does not match"):
        load_optimizer(directory)
    config["config"]["extra"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(MetaflowError, match="config keys"):
        load_optimizer(directory)


def test_divergence_guard_names_the_step_of_an_infinite_loss():
    def factory(seed: int) -> OptimizeeTask:
        base = quadratic_task(seed)
        return OptimizeeTask(base.params, lambda p, t: base.loss(p, t) * (math.inf if t >= 7 else 1.0))

    torch.manual_seed(0)
    with pytest.raises(DivergenceError, match=r"meta-step 1 .*optimizee step 7.*not finite"):
        meta_train_optimizer(LSTMOptimizerNet(), factory, steps=3, unroll=5, horizon=10, seed=0)


def test_divergence_guard_fires_on_an_exploding_output_scale():
    torch.manual_seed(0)
    net = LSTMOptimizerNet(output_scale=1e6)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(DivergenceError, match=r"meta-step 0 .*optimizee step 1\b.*exceeds 1000 x"):
        meta_train_optimizer(net, quadratic_task, steps=2, unroll=5, horizon=10, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_functional_baselines_match_torch_optim():
    task = quadratic_task(7)
    for functional, make in [
        (Adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
        (SGD(1e-3, momentum=0.9), lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)),
    ]:
        theta = torch.nn.Parameter(task.params["theta"].clone())
        opt = make([theta])
        reference = []
        for t in range(5):
            opt.zero_grad()
            loss = task.loss({"theta": theta}, t)
            reference.append(float(loss.detach()))
            loss.backward()
            opt.step()
        reference.append(float(task.loss({"theta": theta.detach()}, 5)))
        assert run_optimizee(task, functional, 5) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_classifier_tasks_meta_train_and_run(model):
    x, y = synthetic_images(ways=3, per_class=8, seed=0)

    def factory(seed: int) -> OptimizeeTask:
        return classifier_task(model, x, y, seed=seed, batch_size=16, hidden=4)

    torch.manual_seed(0)
    net = LSTMOptimizerNet()
    history = meta_train_optimizer(net, factory, steps=2, unroll=2, horizon=2, seed=0).history
    assert len(history) == 2 and all(math.isfinite(h["meta_loss"]) for h in history)
    losses = run_optimizee(factory(5), net, 3)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    task = factory(5)
    assert torch.equal(task.loss(task.params, 2), factory(5).loss(task.params, 2))  # seeded minibatches
