"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

omega   = the embedding f_phi (Conv-4).
theta_i = the prototypes c_k = mean of f_phi(x) over the support examples of class k (eq. 1).
p(y=k|x) = softmax_k(-d(f_phi(x), c_k)), d = squared Euclidean (eq. 2) or cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metaflowlib.methods.base import MetaLearner
from metaflowlib.models.backbones import BackboneSpec, backbone_spec, build_backbone, output_dim


class ProtoNet(MetaLearner):
    """ProtoNet over an embedding f_phi: Conv-4 by default, any backbone (models/backbones.py).

    Args:
        in_channels, image_size: the images' channels and side (set by the data).
        hidden: Conv-4's width (backbone conv4 only).
        backbone: "conv4", "resnet12", or a spec mapping (models/backbones.py).
        distance: "euclidean" (squared, the paper's choice) or "cosine".
        temperature: logit scale for cosine distance (cosine in [-1, 1] is too flat for softmax).
    """

    kind = "protonet"
    block_defaults = {"ways": 60, "shots": 5, "queries": 5}  # Snell et al. train 60-way, more ways than they test
    per_example_features = True

    def __init__(
        self, in_channels: int = 1, hidden: int = 64, distance: str = "euclidean", temperature: float = 10.0,
        backbone: BackboneSpec = "conv4", image_size: int = 28,
    ) -> None:
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        backbone = backbone_spec(backbone)
        super().__init__(in_channels=in_channels, hidden=hidden, distance=distance, temperature=temperature,
                         backbone=backbone, image_size=image_size)
        self.dim = output_dim(backbone, in_channels, image_size, hidden=hidden)
        self.embedding = build_backbone(backbone, in_channels, hidden=hidden)
        self.distance = distance
        self.temperature = temperature

    def features(self, x: Tensor) -> Tensor:
        return self.embedding(x)

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """Prototypes [T, N, D]: class means of support embeddings (eq. 1)."""
        z = support_x.float()
        one_hot = F.one_hot(support_y, ways).to(z.dtype)  # [T, S, N]
        sums = one_hot.transpose(1, 2) @ z  # [T, N, D]
        return sums / one_hot.sum(1)[..., None]

    def predict(self, theta: Tensor, query_x: Tensor) -> Tensor:
        """Logits -d(f(x), c_k): [T, Q, N]."""
        z = query_x.float()
        with torch.autocast(z.device.type, enabled=False):
            if self.distance == "cosine":
                return self.temperature * F.normalize(z, dim=-1) @ F.normalize(theta, dim=-1).transpose(1, 2)
            # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2, one batched matmul
            sq = z.pow(2).sum(-1, keepdim=True) - 2 * z @ theta.transpose(1, 2) + theta.pow(2).sum(-1)[:, None, :]
            return -sq.clamp_min(0)
