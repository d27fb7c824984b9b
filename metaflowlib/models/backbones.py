"""Backbones by name, or your own: the feature map f_phi a few-shot method is built over.

A spec is what a method's params block says under `backbone:` and what its omega records:
- "conv4" or {kind: conv4}: Conv-4 (models/conv4.py); its width and layout are the method's own
  `hidden` and `layout` arguments, as before backbones were configurable.
- "resnet12" or {kind: resnet12, widths: [64, 160, 320, 640], drop_rate: 0.0, dropblock_size: 5, pool: avg}.
- {kind: import, target: "package.module:factory", kwargs: {...}}: any callable returning an nn.Module that
  maps [B, C, S, S] images to [B, D] features.
`output_dim` probes a spec on the data's image shape before any work: a backbone that fails on it, or
returns anything but [B, D], is one BackboneError naming the spec.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from metaflowlib.models.batchnorm import BatchNorm2d
from metaflowlib.models.conv4 import Conv4, Layout
from metaflowlib.models.resnet12 import WIDTHS, ResNet12

BackboneSpec = str | dict[str, Any]
DEFAULTS: dict[str, dict[str, Any]] = {
    "conv4": {},
    "resnet12": {"widths": list(WIDTHS), "drop_rate": 0.0, "dropblock_size": 5, "pool": "avg"},
    "import": {"target": None, "kwargs": {}},
}


class BackboneError(ValueError):
    """A backbone spec that cannot be built, or does not fit the images: the message names the field."""


def backbone_spec(spec: BackboneSpec) -> dict[str, Any]:
    """The spec in full (every default filled in, JSON-able), or a BackboneError naming the bad key."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict) or "kind" not in spec:
        raise BackboneError(f"backbone must be a name ({', '.join(DEFAULTS)}) or a mapping with a kind, got {spec!r}")
    kind = spec["kind"]
    if kind not in DEFAULTS:
        raise BackboneError(f"backbone.kind: unknown backbone {kind!r}; known: {', '.join(DEFAULTS)}")
    unknown = sorted(set(spec) - {"kind", *DEFAULTS[kind]})
    if unknown:
        takes = ", ".join(DEFAULTS[kind]) or "nothing but kind (Conv-4's width and layout are the method's hidden and layout)"
        raise BackboneError(f"backbone.{unknown[0]}: {kind} does not take it (it takes {takes})")
    full = {"kind": kind, **DEFAULTS[kind], **{k: v for k, v in spec.items() if k != "kind"}}
    if kind == "import" and (not isinstance(full["target"], str) or ":" not in full["target"]):
        raise BackboneError(f"backbone.target: expected 'package.module:factory', got {full['target']!r}")
    if kind == "import" and not isinstance(full["kwargs"], dict):
        raise BackboneError(f"backbone.kwargs: expected a mapping, got {full['kwargs']!r}")
    if kind == "resnet12":
        full["widths"] = list(full["widths"])
    return full


def build_backbone(
    spec: BackboneSpec, in_channels: int, *, hidden: int = 64, layout: Layout = "maxpool", composite_bn: bool = False,
    track_running_stats: bool = True,
) -> nn.Module:
    """The feature map of `spec` for `in_channels`-channel images.

    `composite_bn` / `track_running_stats=False` are what the MAML family needs (vmap-safe, transductive
    BatchNorm); an imported module's `nn.BatchNorm2d` layers are swapped for that BatchNorm when either is asked.
    """
    spec = backbone_spec(spec)
    kind = spec["kind"]
    try:
        if kind == "conv4":
            return Conv4(in_channels, hidden, composite_bn=composite_bn, track_running_stats=track_running_stats, layout=layout)
        if kind == "resnet12":
            return ResNet12(in_channels, spec["widths"], drop_rate=spec["drop_rate"], dropblock_size=spec["dropblock_size"],
                            pool=spec["pool"], composite_bn=composite_bn, track_running_stats=track_running_stats)
    except (TypeError, ValueError) as error:
        raise BackboneError(f"backbone ({kind}): {error}") from None
    module = _imported(spec["target"], spec["kwargs"])
    if composite_bn or not track_running_stats:
        swap_batchnorm(module, composite=composite_bn, track_running_stats=track_running_stats)
    return module


def _imported(target: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attribute = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise BackboneError(f"backbone.target: cannot import {target!r}: {error}") from None
    try:
        module = factory(**kwargs)
    except Exception as error:  # noqa: BLE001 - any factory failure is the user's spec; name it
        raise BackboneError(f"backbone.target: {target}(**{kwargs!r}) failed: {type(error).__name__}: {error}") from None
    if not isinstance(module, nn.Module):
        raise BackboneError(f"backbone.target: {target} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def swap_batchnorm(module: nn.Module, *, composite: bool, track_running_stats: bool) -> None:
    """Replace every `nn.BatchNorm2d` inside `module` (in place) by metaflowlib's, keeping its affine values."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            replacement = BatchNorm2d(child.num_features, composite=composite, track_running_stats=track_running_stats,
                                      momentum=child.momentum if child.momentum is not None else 0.1, eps=child.eps)
            if child.affine:
                with torch.no_grad():
                    replacement.weight.copy_(child.weight)
                    replacement.bias.copy_(child.bias)
            setattr(module, name, replacement)
        else:
            swap_batchnorm(child, composite=composite, track_running_stats=track_running_stats)


def output_dim(spec: BackboneSpec, in_channels: int, image_size: int, *, hidden: int = 64, layout: Layout = "maxpool") -> int:
    """D of the backbone's [B, D] features on [B, in_channels, image_size, image_size] images, found by building a
    throwaway copy (the global RNG is left untouched, so the real one initializes as it would without the probe)."""
    spec = backbone_spec(spec)
    name = spec["target"] if spec["kind"] == "import" else spec["kind"]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        module = build_backbone(spec, in_channels, hidden=hidden, layout=layout).eval()
        try:
            out = module(torch.zeros(2, in_channels, image_size, image_size))
        except RuntimeError as error:
            raise BackboneError(f"backbone {name} does not take {in_channels}x{image_size}x{image_size} images "
                                f"(data.channels / data.image_size): {str(error).splitlines()[0]}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BackboneError(f"backbone {name} maps {in_channels}x{image_size}x{image_size} images to {shape}; "
                            "a backbone must return features [B, D] (pool or flatten its last map)")
    return int(out.shape[1])
