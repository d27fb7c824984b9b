"""Backbones by name or import (issue 19): every few-shot method over Conv-4, ResNet-12 and a user's module, RGB in,
exact second-order MAML under vmap on residual blocks, and one clear refusal for a backbone that does not fit."""

from __future__ import annotations

import pytest
import torch
from test_maml_family import float64_meta_gradient, reference_maml_gradient, relative_error
from torch import nn

from metaflowlib.artifacts import load_meta_knowledge, save_meta_knowledge
from metaflowlib.config import parse_params
from metaflowlib.config.methods import method_spec
from metaflowlib.episodes import Episode
from metaflowlib.errors import ConfigError
from metaflowlib.methods import MAML, METHODS, ProtoNet, build_method
from metaflowlib.models import BackboneError, BatchNorm2d, ResNet12, backbone_spec, build_backbone, output_dim
from metaflowlib.models.resnet12 import DropBlock

pytestmark = pytest.mark.usefixtures("one_thread")

NARROW = {"kind": "resnet12", "widths": [4, 6, 8, 8]}
IMPORTED = {"kind": "import", "target": "test_backbones:small_net", "kwargs": {"in_channels": 3, "width": 6}}
WAYS, SHOTS, QUERIES, SIDE = 3, 2, 2, 16


def small_net(in_channels: int, width: int) -> nn.Module:
    """A user's own feature map, with torch's BatchNorm (swapped for the vmap-safe one by the MAML family)."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def spatial_net() -> nn.Module:
    """Forgets to pool: [B, 4, S, S] out."""
    return nn.Conv2d(1, 4, 3, padding=1)


def rgb_episode(tasks: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(WAYS).repeat_interleave(k).expand(tasks, -1)  # noqa: E731
    return Episode(support_x=torch.randn(tasks, WAYS * SHOTS, 3, SIDE, SIDE, generator=g, dtype=dtype), support_y=labels(SHOTS),
                   query_x=torch.randn(tasks, WAYS * QUERIES, 3, SIDE, SIDE, generator=g, dtype=dtype), query_y=labels(QUERIES),
                   ways=WAYS)


@pytest.mark.parametrize("backbone", ["conv4", NARROW, IMPORTED], ids=["conv4", "resnet12", "import"])
@pytest.mark.parametrize("kind", sorted(METHODS))
def test_every_method_meta_trains_over_every_backbone_on_rgb(kind: str, backbone) -> None:
    torch.manual_seed(0)
    config = {"in_channels": 3, "image_size": SIDE, "backbone": backbone, "hidden": 8}
    if kind not in ("protonet", "param_prediction"):
        config.update(ways=WAYS, vectorize="loop")
    method = build_method(kind, **config)
    trainable = [p for p in method.parameters() if p.requires_grad]
    stats = method.meta_gradient(rgb_episode())
    assert torch.isfinite(torch.as_tensor(stats.loss))
    grads = [p.grad for p in trainable if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    method.eval()
    with torch.no_grad():
        logits = method.adapt_and_predict(rgb_episode(seed=1))
    assert logits.shape == (2, WAYS * QUERIES, WAYS)


@pytest.mark.parametrize("backbone", [NARROW, IMPORTED], ids=["resnet12", "import"])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_second_order_maml_meta_gradient_is_exact_on_the_backbone(backbone, vectorize: str) -> None:
    """float64: vmap (composite BatchNorm, swapped into an imported module) and the per-task loop both equal a
    sequential plain-autograd reference, 2 inner steps, residual blocks included."""
    torch.manual_seed(0)
    maml = MAML(ways=WAYS, in_channels=3, image_size=SIDE, backbone=backbone, inner_steps=2, inner_lr=0.1, vectorize=vectorize).double()
    with torch.no_grad():
        maml.net[1].weight.normal_(0, 0.5)
    assert any(isinstance(m, BatchNorm2d) for m in maml.net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in maml.net.modules())
    episode = rgb_episode(tasks=3, dtype=torch.float64)
    expected = reference_maml_gradient(maml.net, episode, 2, maml.inner_lr, first_order=False)
    assert relative_error(float64_meta_gradient(maml, episode), expected) < 1e-10


def test_resnet12_is_the_standard_shape() -> None:
    """Lee et al.'s 64-160-320-640 at 84x84 RGB: 640-dim features, about 12.4M parameters."""
    net = ResNet12(3)
    assert output_dim("resnet12", 3, 84) == 640
    assert 12.0e6 < sum(p.numel() for p in net.parameters()) < 12.6e6
    assert output_dim({"kind": "resnet12", "pool": "flatten"}, 3, 84) == 640 * 5 * 5


def test_dropblock_drops_blocks_in_training_only_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    block = DropBlock(0.2, 3).train()
    x = torch.ones(64, 4, 10, 10)
    y = block(x)
    dropped = float((y == 0).float().mean())
    assert 0.1 < dropped < 0.3 and abs(float(y.mean()) - 1) < 0.05
    assert torch.equal(block.eval()(x), x)
    maml = MAML(ways=WAYS, in_channels=3, image_size=SIDE, backbone={**NARROW, "drop_rate": 0.1}, vectorize="vmap")
    assert torch.isfinite(torch.as_tensor(maml.meta_gradient(rgb_episode()).loss))  # random masks under vmap: per task


def test_the_omega_records_its_backbone_and_rebuilds_it(tmp_path) -> None:
    torch.manual_seed(0)
    method = ProtoNet(in_channels=3, image_size=SIDE, backbone=NARROW)
    saved = save_meta_knowledge(method, tmp_path / "omega")
    loaded, config = load_meta_knowledge(saved)
    assert config["config"]["backbone"] == backbone_spec(NARROW)
    x = torch.randn(4, 3, SIDE, SIDE)
    method.eval()
    assert torch.equal(loaded.features(x), method.features(x))


@pytest.mark.parametrize(("backbone", "message"), [
    ({"kind": "resnet13"}, "methods.m.backbone.kind: unknown backbone 'resnet13'"),
    ({"kind": "resnet12", "depth": 18}, "methods.m.backbone.depth: resnet12 does not take it"),
    ({"kind": "resnet12", "widths": [8, 8]}, "methods.m.backbone (resnet12): widths must be 4 positive channel counts"),
    ({"kind": "import", "target": "test_backbones:spatial_net"}, "maps 1x28x28 images to [2, 4, 28, 28]"),
    ({"kind": "import", "target": "no_such_module:net"}, "methods.m.backbone.target: cannot import"),
    ({"kind": "import", "target": "test_backbones"}, "methods.m.backbone.target: expected 'package.module:factory'"),
])
def test_a_backbone_that_does_not_fit_is_one_error_naming_the_field(backbone, message: str) -> None:
    p = parse_params({"methods": {"m": {"kind": "protonet", "backbone": backbone}}})
    with pytest.raises(ConfigError) as error:
        method_spec(p, "m")
    assert message in str(error.value)


def test_images_too_small_for_the_backbone_are_refused_naming_the_data_fields() -> None:
    p = parse_params({"data": {"image_size": 8}, "methods": {"m": {"kind": "maml", "backbone": NARROW}}})
    with pytest.raises(ConfigError, match=r"methods\.m\.backbone resnet12 does not take 1x8x8 images \(data.channels / data.image_size\)"):
        method_spec(p, "m")


def test_output_dim_leaves_the_global_rng_where_it_was() -> None:
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    output_dim(NARROW, 3, SIDE)
    assert torch.equal(torch.rand(1), expected)


def test_an_imported_module_keeps_its_batchnorm_unless_the_method_needs_the_transductive_one() -> None:
    kept = build_backbone(IMPORTED, 3)
    swapped = build_backbone(IMPORTED, 3, composite_bn=True, track_running_stats=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in swapped.modules())
    with pytest.raises(BackboneError, match="returned int"):
        build_backbone({"kind": "import", "target": "builtins:int"}, 3)
