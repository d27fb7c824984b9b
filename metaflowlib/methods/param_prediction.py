"""Parameter prediction from activations (Qiao et al., CVPR 2018; Gidaris & Komodakis, CVPR 2018).

A feature map f, pre-trained by ordinary many-way classification and then
frozen, turns each example into a unit-norm activation a(x) = f(x)/||f(x)||.
omega   = the parameter predictor phi: class statistics -> classifier weights.
theta_i = the predicted classifier (w_k, b_k) of each class k of task i, from
          the mean activation of its support examples, a_k = mean a(x) (Qiao et al. eq. 3):
              w_k = phi_w(a_k)                      (Qiao et al.: predicted weights)
              w_k = phi_avg * a_k + phi_w(a_k)      (combine_prototypes: Gidaris & Komodakis eq. 6)
              b_k = phi_b(a_k)
p(y=k|x) = softmax_k(s * cos(w_k, a(x)) + b_k), s a learned scale (cosine classifier).

The query examples only score the predicted classifier: the predictor's
gradient reaches it through theta_i alone, and f receives none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.methods.base import MetaLearner
from metaflowlib.models.backbones import BackboneSpec, backbone_spec, build_backbone, output_dim


class ParameterPredictor(MetaLearner):
    """Predict a cosine classifier's weights and biases from support activations.

    Args:
        in_channels, image_size: the images' channels and side (set by the data).
        hidden: Conv-4's width (backbone conv4 only).
        backbone: the frozen feature map: "conv4", "resnet12" or a spec mapping (models/backbones.py).
        predictor_hidden: width of phi's hidden layer; 0 makes phi linear (Qiao et al.).
        combine_prototypes: add phi_avg * a_k, the prototype term of Gidaris & Komodakis.
        scale: initial value of the learned cosine scale s.
    """

    kind = "param_prediction"
    block_defaults = {"ways": 20, "shots": 5, "queries": 15, "tasks_per_step": 4, "pretrain": {},
                      "budget": {"default": {"episodes": 20000}, "full": {"episodes": 20000}}}
    per_example_features = True
    frozen_features = True
    pretrained_module = "embedding"

    def __init__(
        self, in_channels: int = 1, hidden: int = 64, image_size: int = 28, predictor_hidden: int = 256,
        combine_prototypes: bool = True, scale: float = 10.0, backbone: BackboneSpec = "conv4",
    ) -> None:
        backbone = backbone_spec(backbone)
        super().__init__(in_channels=in_channels, hidden=hidden, image_size=image_size, predictor_hidden=predictor_hidden,
                         combine_prototypes=combine_prototypes, scale=scale, backbone=backbone)
        self.embedding = build_backbone(backbone, in_channels, hidden=hidden).requires_grad_(False)
        dim = output_dim(backbone, in_channels, image_size, hidden=hidden)
        self.phi = _predictor(dim, predictor_hidden, residual=combine_prototypes)
        self.phi_avg = nn.Parameter(torch.ones(dim)) if combine_prototypes else None
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.dim = dim

    def train(self, mode: bool = True) -> ParameterPredictor:
        """Meta-training never moves the feature map, BatchNorm statistics included."""
        super().train(mode)
        self.embedding.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """a(x): unit-norm activations of the frozen feature map (its weights require no gradient,
        so autograd records nothing here unless test-time adaptation unfreezes some)."""
        return F.normalize(self.embedding(x).float(), dim=-1)

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int) -> tuple[Tensor, Tensor]:
        """theta_i = (w [T, N, D], b [T, N]) predicted from the class means a_k [T, N, D]."""
        a = support_x.float()
        one_hot = F.one_hot(support_y, ways).to(a.dtype)  # [T, S, N]
        a_k = (one_hot.transpose(1, 2) @ a) / one_hot.sum(1)[..., None]
        out = self.phi(a_k).float()
        w, b = out[..., : self.dim], out[..., self.dim]
        if self.phi_avg is not None:
            w = w + self.phi_avg * a_k
        return w, b

    def predict(self, theta: tuple[Tensor, Tensor], query_x: Tensor) -> Tensor:
        """Logits s * cos(w_k, a(x)) + b_k: [T, Q, N]."""
        w, b = theta
        with torch.autocast(query_x.device.type, enabled=False):
            cosine = F.normalize(query_x.float(), dim=-1) @ F.normalize(w, dim=-1).transpose(1, 2)
            return self.log_scale.exp() * cosine + b[:, None, :]


def _predictor(dim: int, hidden: int, residual: bool) -> nn.Module:
    """phi: D -> D weights + 1 bias.

    With the prototype term, phi's output starts at zero; a linear phi without
    it starts as the identity: either way meta-training starts from the
    cosine-prototype classifier. A non-residual MLP starts from PyTorch's init.
    """
    phi = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim + 1)) if hidden else nn.Linear(dim, dim + 1)
    last = phi[-1] if hidden else phi
    if residual:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    elif not hidden:
        with torch.no_grad():
            last.weight.zero_()
            last.weight[:dim].copy_(torch.eye(dim))
            last.bias.zero_()
    return phi
