"""Backbones and heads shared by every method."""

from metaflowlib.models.backbones import BackboneError, BackboneSpec, backbone_spec, build_backbone, output_dim
from metaflowlib.models.batchnorm import BatchNorm2d
from metaflowlib.models.conv4 import Conv4, conv4_output_dim
from metaflowlib.models.resnet12 import ResNet12

__all__ = ["BackboneError", "BackboneSpec", "BatchNorm2d", "Conv4", "ResNet12", "backbone_spec", "build_backbone",
           "conv4_output_dim", "output_dim"]
