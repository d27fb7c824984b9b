"""The LSTM optimizer of Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient descent".

omega = the weights phi of a small LSTM m shared by every coordinate of every
tensor. Each coordinate i keeps its own hidden state and is updated by
(eq. 1, Fig. 3):

    [g_t, h_{t+1}] = m(grad_i f(theta_t), h_t; phi)      theta_{t+1} = theta_t + g_t

The gradient enters preprocessed (Appendix A) so that magnitudes spanning many
orders reach the LSTM on one scale. Coordinates are a batch: all tensors are
flattened and concatenated into one [N] vector, and the LSTM runs once per step.

Three faces of the same mathematics:
- `LSTMOptimizerNet.init_state` / `step`: functional and differentiable, the
  shape of the inner-loop optimizer protocol (`metaflowlib.methods.inner_optimizers`),
  used by meta-training and by MAML-style inner loops.
- `LearnedOptimizer`: a `torch.optim.Optimizer` over any parameter list.
- `save_optimizer` / `load_optimizer`: omega as safetensors + JSON, never pickle.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaflowlib.errors import DataError
from metaflowlib.io import CONFIG_FILE, WEIGHTS_FILE, read_tensor_dir, write_tensor_dir

KIND = "lstm_optimizer"


def preprocess_gradient(g: Tensor, p: float = 10.0) -> Tensor:
    """Appendix A: g -> (log|g| / p, sign g) if |g| >= e^-p, else (-1, e^p g). Shape [..., 2].

    The log keeps large gradients on a unit scale; the linear branch keeps tiny
    ones (and zero) distinguishable instead of sending log|g| to -inf.
    """
    threshold = math.exp(-p)
    magnitude = g.abs()
    large = magnitude >= threshold
    log_part = torch.log(magnitude.clamp_min(threshold)) / p
    first = torch.where(large, log_part, torch.full_like(g, -1.0))
    second = torch.where(large, torch.sign(g), g * math.exp(p))
    return torch.stack([first, second], dim=-1)


class LSTMState(NamedTuple):
    """Per-coordinate LSTM memory, one entry per layer: h[l], c[l] are [N, hidden].

    A NamedTuple of tensors is a pytree, so the state passes through
    `torch.func` transforms like the parameters do.
    """

    h: tuple[Tensor, ...]
    c: tuple[Tensor, ...]


class LSTMOptimizerNet(nn.Module):
    """Coordinate-wise LSTM optimizer m(grad, h; phi).

    Args:
        hidden_size: units per LSTM layer (20 in the paper).
        num_layers: stacked LSTM layers (2 in the paper).
        output_scale: the update is the linear head's output times this (0.1 in the paper).
        preprocess_p: p of the gradient preprocessing (10 in the paper).

    Example:
        >>> net = LSTMOptimizerNet()
        >>> state = net.init_state(params)
        >>> params, state = net.step(params, grads, state)
    """

    def __init__(
        self, hidden_size: int = 20, num_layers: int = 2, output_scale: float = 0.1, preprocess_p: float = 10.0
    ) -> None:
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1, got {hidden_size} and {num_layers}")
        if not (output_scale > 0 and math.isfinite(output_scale)):
            raise ValueError(f"output_scale must be a positive finite number, got {output_scale}")
        if not preprocess_p > 0:
            raise ValueError(f"preprocess_p must be > 0, got {preprocess_p}")
        super().__init__()
        self._config = dict(
            hidden_size=hidden_size, num_layers=num_layers, output_scale=output_scale, preprocess_p=preprocess_p
        )
        self.hidden_size = hidden_size
        self.output_scale = output_scale
        self.preprocess_p = preprocess_p
        sizes = [2] + [hidden_size] * num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(sizes[i], sizes[i + 1]) for i in range(num_layers))
        self.head = nn.Linear(hidden_size, 1)

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments: `LSTMOptimizerNet(**config)` rebuilds the architecture."""
        return dict(self._config)

    def zero_state(self, n: int) -> LSTMState:
        """Fresh memory for n coordinates."""
        weight = self.head.weight
        zeros = tuple(weight.new_zeros(n, self.hidden_size) for _ in self.cells)
        return LSTMState(h=zeros, c=zeros)

    def forward(self, grad: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """One step for a batch of coordinates: grad [N] -> (update [N], new state)."""
        x = preprocess_gradient(grad.to(self.head.weight.dtype), self.preprocess_p)  # [N, 2]
        hs, cs = [], []
        for cell, h, c in zip(self.cells, state.h, state.c):
            h, c = _lstm_cell(cell, x, h, c)
            hs.append(h)
            cs.append(c)
            x = h
        update = self.head(x).squeeze(-1) * self.output_scale
        return update, LSTMState(h=tuple(hs), c=tuple(cs))

    def init_state(self, params: Mapping[str, Tensor]) -> LSTMState:
        """Zero memory for every coordinate of `params` (flattened in the mapping's order)."""
        return self.zero_state(sum(p.numel() for p in params.values()))

    init = init_state  # the inner-loop optimizer protocol's name for it

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: LSTMState
    ) -> tuple[dict[str, Tensor], LSTMState]:
        """theta_{t+1} = theta_t + m(grad, h_t; phi), differentiable in phi and theta.

        The gradients are used as given: meta-training passes constants
        (computed without `create_graph`), which drops the optimizee's second
        derivatives as in Sec. 2 of the paper.
        """
        flat = torch.cat([grads[name].reshape(-1) for name in params])
        if flat.numel() != state.h[0].shape[0]:
            raise ValueError(
                f"the LSTM state holds {state.h[0].shape[0]} coordinates but the parameters have {flat.numel()}; "
                "call init_state on these parameters"
            )
        update, state = self(flat, state)
        pieces = update.split([p.numel() for p in params.values()])
        new_params = {
            name: p + u.view_as(p).to(p.dtype) for (name, p), u in zip(params.items(), pieces)
        }
        return new_params, state


def _lstm_cell(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """`nn.LSTMCell` written from composite ops: aten::lstm_cell has no vmap batching rule
    (torch 2.13), and MAML's inner loop maps tasks with vmap on CUDA. Gate order i, f, g, o as in torch.
    """
    gates = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(h, cell.weight_hh, cell.bias_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class LearnedOptimizer(torch.optim.Optimizer):
    """`torch.optim` front end of a trained `LSTMOptimizerNet`.

    Every parameter with a gradient is a slice of one coordinate batch; its
    LSTM memory lives in `self.state[p]` as h, c of shape [layers, numel, hidden],
    so `state_dict()` / `load_state_dict()` carry it. The net (omega) is not part
    of the state: save it with `save_optimizer`.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        net: the trained LSTM; it is only read, under no_grad.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], net: LSTMOptimizerNet) -> None:
        super().__init__(params, defaults={})
        self.net = net

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        if any(p.grad.is_sparse for p in params):
            raise ValueError("LearnedOptimizer does not support sparse gradients")
        dtype = self.net.head.weight.dtype
        for p in params:
            if not self.state[p]:
                zeros = p.new_zeros(len(self.net.cells), p.numel(), self.net.hidden_size, dtype=dtype)
                self.state[p]["h"], self.state[p]["c"] = zeros, zeros.clone()
        grad = torch.cat([p.grad.reshape(-1).to(dtype) for p in params])
        h = torch.cat([self.state[p]["h"].to(dtype) for p in params], dim=1)  # [layers, N, hidden]
        c = torch.cat([self.state[p]["c"].to(dtype) for p in params], dim=1)
        update, new = self.net(grad, LSTMState(h=tuple(h.unbind(0)), c=tuple(c.unbind(0))))
        sizes = [p.numel() for p in params]
        h_parts = torch.stack(new.h).split(sizes, dim=1)
        c_parts = torch.stack(new.c).split(sizes, dim=1)
        for p, u, hp, cp in zip(params, update.split(sizes), h_parts, c_parts):
            p.add_(u.view_as(p).to(p.dtype))
            self.state[p]["h"].copy_(hp)
            self.state[p]["c"].copy_(cp)
        return loss


def save_optimizer(net: LSTMOptimizerNet, directory: str | os.PathLike) -> Path:
    """Write omega as `model.safetensors` + `config.json`; the directory appears whole or not at all."""
    return write_tensor_dir(directory, net.state_dict(), {"kind": KIND, "config": net.config()})


def load_optimizer(directory: str | os.PathLike) -> LSTMOptimizerNet:
    """Rebuild an `LSTMOptimizerNet` from `save_optimizer`'s files (JSON + safetensors only, never pickle).

    Raises DataError when a file is missing or not in these formats, when the
    weights do not match the architecture the config describes, or when they
    are not finite (a diverged optimizer is never loaded).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    saved, tensors = read_tensor_dir(directory)
    if saved.get("kind") != KIND or not isinstance(saved.get("config"), dict):
        raise DataError(f"{config_path} does not describe a learned optimizer (expected kind {KIND!r} and a config object)")
    config = saved["config"]
    expected = set(inspect.signature(LSTMOptimizerNet.__init__).parameters) - {"self"}
    if set(config) != expected:
        raise DataError(f"{config_path}: config keys {sorted(config)} do not match LSTMOptimizerNet's {sorted(expected)}")
    try:
        net = LSTMOptimizerNet(**config)
    except (TypeError, ValueError) as err:
        raise DataError(f"{config_path}: invalid config: {err}") from None
    wanted = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != wanted:
        problems = [f"missing {name} {shape}" for name, shape in wanted.items() if name not in found]
        problems += [f"unexpected {name} {shape}" for name, shape in found.items() if name not in wanted]
        problems += [f"{name} is {found[name]}, config implies {shape}" for name, shape in wanted.items()
                     if name in found and found[name] != shape]
        raise DataError(f"{weights_path} does not match {config_path}: " + "; ".join(problems))
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise DataError(f"{weights_path} holds non-finite weights in {bad}: refusing a diverged optimizer")
    net.load_state_dict(tensors)
    return net
