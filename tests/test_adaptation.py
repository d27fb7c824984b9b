"""Test-time adaptation strategies on tiny CPU models (seconds, no data)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import Tensor, nn

from metaflowlib.tta.strategies import (
    STRATEGIES,
    BNAdapter,
    SourceAdapter,
    TentAdapter,
    TTTAdapter,
    TTTModel,
    build_adapter,
    entropy,
    joint_loss,
    rotate_batch,
)
from metaflowlib.tta.strategies.base import batchnorm_layers
from metaflowlib.models import BatchNorm2d

CLASSES = 5
SIDE = 16  # four halvings leave a 1x1 map in Conv-4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_classifier() -> nn.Module:
    """Both BatchNorm kinds (ours and torch's), with warmed-up running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (BatchNorm2d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(5):
            model(torch.randn(16, 1, SIDE, SIDE))
    return model.eval()


def tiny_ttt_model() -> TTTModel:
    torch.manual_seed(0)
    return TTTModel.conv4(CLASSES, image_size=SIDE, hidden=4, shared_blocks=2).eval()


def batch(n: int = 16, seed: int = 1) -> Tensor:
    return torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return copy.deepcopy(model.state_dict())


def assert_same_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def is_bn(name: str, model: nn.Module) -> bool:
    return isinstance(model.get_submodule(name.rsplit(".", 1)[0]), (BatchNorm2d, nn.BatchNorm2d))


def test_entropy() -> None:
    assert torch.allclose(entropy(torch.zeros(3, CLASSES)), torch.full((3,), math.log(CLASSES)))
    assert entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() < 1e-6


@pytest.mark.parametrize(
    "optimizer", [None, functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)], ids=["adam", "sgd"]
)
def test_tent_updates_only_batchnorm_affine(optimizer) -> None:
    model = tiny_classifier()
    source = snapshot(model)
    tent = TentAdapter(model) if optimizer is None else TentAdapter(model, optimizer=optimizer)
    tent.predict(batch())

    assert_same_state(model, source)  # the caller's module is untouched
    bn_params = 0
    for name, p in tent.model.named_parameters():
        if is_bn(name, tent.model):
            bn_params += 1
            assert not torch.equal(p, source[name]), f"BN parameter {name} did not move"
        else:
            assert torch.equal(p, source[name]), f"non-BN parameter {name} changed"
    assert bn_params == 4  # weight and bias of both layers
    for layer in (tent.model[1], tent.model[5]):  # ours and torch's: no running statistics kept or updated
        assert layer.running_mean is None and layer.running_var is None
    for name, buf in tent.model.named_buffers():
        assert torch.equal(buf, source[name]), name  # e.g. num_batches_tracked does not count


def test_tent_lowers_entropy_on_a_fixed_batch() -> None:
    tent, x = TentAdapter(tiny_classifier()), batch()
    first = entropy(tent.predict(x)).mean()
    for _ in range(10):
        last = entropy(tent.predict(x)).mean()
    assert last < first


@pytest.mark.parametrize(
    "make", [lambda episodic: TentAdapter(tiny_classifier(), episodic=episodic),
             lambda episodic: TTTAdapter(tiny_ttt_model(), episodic=episodic, steps=3)],
    ids=["tent", "ttt"],
)
def test_episodic_resets_online_carries_over(make) -> None:
    x = batch()
    episodic, online = make(True), make(False)
    assert torch.equal(episodic.predict(x), episodic.predict(x))
    assert not torch.equal(online.predict(x), online.predict(x))


def test_bn_uses_test_batch_statistics_source_does_not() -> None:
    model, x = tiny_classifier(), batch()
    shifted = torch.cat([x[:4], 3 * x[4:] + 2])  # same first 4 examples, different batch statistics

    bn = BNAdapter(model)
    assert not torch.allclose(bn.predict(x)[:4], bn.predict(shifted)[:4])

    source = SourceAdapter(model)
    in_batch = source.predict(x)
    assert torch.allclose(in_batch[:4], source.predict(shifted)[:4], atol=1e-6)
    alone = torch.cat([source.predict(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(in_batch[:4], alone, atol=1e-6)


def test_bn_needs_batchnorm_and_a_batch() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        BNAdapter(nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES)))
    with pytest.raises(ValueError, match="at least 2 examples"):
        BNAdapter(tiny_classifier()).predict(batch(1))


def test_rotate_batch_matches_rot90() -> None:
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    x_rot, labels = rotate_batch(x)
    assert x_rot.shape == (8, 1, 3, 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for k in range(4):
        for i in range(2):
            assert torch.equal(x_rot[2 * k + i, 0], torch.rot90(x[i, 0], k))
    assert torch.equal(x_rot[2, 0], torch.tensor([[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]]))  # 90 deg CCW
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(2, 1, 3, 4))


def test_ttt_model_heads_and_joint_loss() -> None:
    model, x = tiny_ttt_model(), batch(6)
    assert model(x).shape == (6, CLASSES)
    assert model.rotation_logits(x).shape == (6, 4)
    loss = joint_loss(model.train(), x, torch.arange(6) % CLASSES)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("update_rotation_head", [False, True])
def test_ttt_updates_extractor_not_main_head_and_resets(update_rotation_head: bool) -> None:
    model = tiny_ttt_model()
    source = snapshot(model)
    ttt = TTTAdapter(model, episodic=False, update_rotation_head=update_rotation_head)
    ttt.predict(batch())

    assert_same_state(model, source)
    moved = {name: not torch.equal(p, source[name]) for name, p in ttt.model.named_parameters()}
    # every conv feeds a BatchNorm whose batch mean subtracts the conv's bias: its gradient is zero
    cancelled = {f"{name}.bias" for name, m in ttt.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert not any(moved[k] for k in cancelled)
    assert all(v for k, v in moved.items() if k.startswith("extractor.") and k not in cancelled)
    assert not any(v for k, v in moved.items() if k.startswith("head."))
    assert all(v == update_rotation_head for k, v in moved.items() if k.startswith("rotation_head.") and k not in cancelled)
    for layer in batchnorm_layers(ttt.model):  # test-batch statistics: no running statistics kept or updated
        assert layer.running_mean is None and layer.running_var is None

    ttt.reset()
    assert all(torch.equal(p, source[name]) for name, p in ttt.model.named_parameters())
    assert torch.equal(ttt.model(batch()), BNAdapter(model).predict(batch()))


def test_ttt_normalizes_with_the_test_batch() -> None:
    """Issue 6: with the source running statistics, TTT trailed the unadapted source classifier under shift."""
    model, x = tiny_ttt_model(), batch()
    frozen = functools.partial(torch.optim.SGD, lr=0.0)  # weights unchanged: only the normalization differs
    bn = BNAdapter(model).predict(x)
    assert torch.allclose(TTTAdapter(model, optimizer=frozen).predict(x), bn, atol=1e-6)
    running = TTTAdapter(model, optimizer=frozen, batch_statistics=False).predict(x)
    assert torch.allclose(running, model(x), atol=1e-6)
    assert not torch.allclose(running, bn, atol=1e-3)
    with pytest.raises(ValueError, match="'ttt' strategy .* at least 2 examples"):
        TTTAdapter(model).predict(batch(1))


def test_ttt_defaults_follow_the_paper() -> None:
    assert TTTAdapter(tiny_ttt_model()).steps == 10
    assert TTTAdapter(tiny_ttt_model(), episodic=False).steps == 1
    group = TTTAdapter(tiny_ttt_model()).optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-3, 0.0, 0.0)
    with pytest.raises(ValueError, match="needs a TTTModel"):
        TTTAdapter(tiny_classifier())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ["tent", "ttt"])
def test_gradient_strategies_adapt_under_the_evaluations_grad_context(name: str, context) -> None:
    model = tiny_ttt_model()
    adapter = build_adapter(name, model, episodic=False)
    with context():
        adapter.predict(batch())
    moved = [n for n, p in adapter.model.named_parameters() if not torch.equal(p, model.state_dict()[n])]
    assert moved


def test_registry_builds_every_strategy() -> None:
    assert set(STRATEGIES) == {"source", "bn", "tent", "ttt"}
    model, x = tiny_ttt_model(), batch(4)
    for name in STRATEGIES:
        assert build_adapter(name, model).predict(x).shape == (4, CLASSES)
    assert build_adapter("tent", model, steps=2, episodic=True).steps == 2


def test_unknown_strategy_or_option_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown adaptation strategy 'tnet'.*'tent'"):
        build_adapter("tnet", tiny_classifier())
    with pytest.raises(TypeError, match="'bn' does not take \\['lr'\\]"):
        build_adapter("bn", tiny_classifier(), lr=0.1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        build_adapter("tent", tiny_classifier(), steps=0)
