"""Backbones and heads shared by every method."""

from metaflowlib.models.batchnorm import BatchNorm2d
from metaflowlib.models.conv4 import Conv4, conv4_output_dim

__all__ = ["BatchNorm2d", "Conv4", "conv4_output_dim"]
