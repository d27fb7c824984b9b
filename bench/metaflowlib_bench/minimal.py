"""The minimal loop (issue 16): a meta-training step with nothing around it, the limit ours is measured against.

The whole split sits on the device as one class-sorted tensor; a step draws its task indices there (a
torch.Generator on that device), runs Conv-4 as a function of a parameter dict and applies Adam (fused on
CUDA): no registry, no method object, no logging, no divergence guard, no host sync. `compile=True` wraps
the loss in `torch.compile` (tried on CUDA only).

    ProtoNet  Snell et al.'s step: max-pooled Conv-4 (fused batch norm), squared euclidean distance to the
              class means of the support embeddings.
    MAML      Finn et al.'s second-order step: strided Conv-4 + linear head, one inner SGD step at alpha,
              `torch.func.grad` inside `torch.func.vmap` over the meta-batch, the outer gradient by
              backward through both; the batch norm is composite (metaflowlib.models.batchnorm says why).

    step = protonet_step(pool, 60, 5, 5, device)   # or maml_step(pool, 5, 1, 15, 32, device)
    step()                                         # one meta-step, queued on the device
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from metaflowlib.episodes import TaskPool

Params = dict[str, Tensor]


class DeviceTasks:
    """Task indices drawn where the split is: T tasks of N classes x `per_task` examples, label j = class j.

    Uses each class's first `width` examples (`width` = the smallest class; Omniglot has 20 of every character).
    """

    def __init__(self, pool: TaskPool, seed: int = 0) -> None:
        device = pool.examples.device
        self.width = int(pool.counts.min())
        self.table = (pool.offsets[:, None] + torch.arange(self.width)).to(device)  # [C, width] example positions
        self.generator = torch.Generator(device).manual_seed(seed)

    def draw(self, tasks: int, ways: int, per_task: int) -> Tensor:
        """[T, N, per_task] positions: N distinct classes per task, `per_task` distinct examples per class."""
        if per_task > self.width:
            raise ValueError(f"{per_task} examples per class asked, the smallest class has {self.width}")
        device, classes = self.table.device, self.table.shape[0]
        chosen = torch.rand(tasks, classes, generator=self.generator, device=device).argsort(1)[:, :ways]  # [T, N]
        picks = torch.rand(tasks, ways, self.width, generator=self.generator, device=device).argsort(2)[..., :per_task]
        return self.table[chosen[..., None], picks]


def conv4_params(device: torch.device, hidden: int = 64, ways: int | None = None, seed: int = 0) -> Params:
    """Conv-4 (+ an N-way head, zero-initialized as ours) as a flat dict, in our modules' parameter order."""
    generator, params, channels = torch.Generator().manual_seed(seed), {}, 1
    for i in range(4):
        params[f"conv{i}.weight"] = torch.randn(hidden, channels, 3, 3, generator=generator) * math.sqrt(2 / (9 * channels))
        params[f"conv{i}.bias"] = torch.zeros(hidden)
        params[f"bn{i}.weight"], params[f"bn{i}.bias"] = torch.ones(hidden), torch.zeros(hidden)
        channels = hidden
    if ways is not None:
        params["head.weight"], params["head.bias"] = torch.zeros(ways, hidden), torch.zeros(ways)
    return {name: p.to(device).requires_grad_() for name, p in params.items()}


def conv4(params: Params, x: Tensor, strided: bool) -> Tensor:
    """[B, 1, 28, 28] -> max-pooled: [B, 64] embeddings (fused batch norm); strided: [B, N] logits (composite)."""
    for i in range(4):
        x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride=2 if strided else 1, padding=1)
        weight, bias = params[f"bn{i}.weight"], params[f"bn{i}.bias"]
        if strided:  # composite: second derivatives stay right under vmap
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
            x = (x - mean) * (weight.view(1, -1, 1, 1) * torch.rsqrt(var + 1e-5)) + bias.view(1, -1, 1, 1)
        else:
            x = F.batch_norm(x, None, None, weight, bias, training=True)
        x = F.relu(x)
        if not strided:
            x = F.max_pool2d(x, 2)
    return F.linear(x.mean((2, 3)), params["head.weight"], params["head.bias"]) if strided else x.flatten(1)


def labels(ways: int, per_class: int, device: torch.device) -> Tensor:
    return torch.arange(ways * per_class, device=device) // per_class  # class-major: 0..0 1..1 ...


def protonet_loss(params: Params, x: Tensor, shots: int, query_labels: Tensor) -> Tensor:
    """x [T, N, K+Q, 1, 28, 28] -> mean query cross-entropy of -||f(x) - c_k||^2."""
    t, n, per_class = x.shape[:3]
    z = conv4(params, x.flatten(0, 2), strided=False).view(t, n, per_class, -1)
    prototypes, queries = z[:, :, :shots].mean(2), z[:, :, shots:].flatten(1, 2)  # [T, N, D], [T, N*Q, D]
    distances = queries.pow(2).sum(-1, keepdim=True) - 2 * queries @ prototypes.transpose(1, 2) \
        + prototypes.pow(2).sum(-1)[:, None, :]
    return F.cross_entropy(-distances.clamp_min(0).flatten(0, 1), query_labels.repeat(t))


def maml_loss(params: Params, x: Tensor, shots: int, alpha: float, support_labels: Tensor, query_labels: Tensor) -> Tensor:
    """x [T, N, K+Q, 1, 28, 28] -> mean over tasks of the query loss after one inner SGD step from `params`."""

    def adapted_query_loss(task: Tensor) -> Tensor:  # [N, K+Q, 1, 28, 28]
        support, query = task[:, :shots].flatten(0, 1), task[:, shots:].flatten(0, 1)
        inner = torch.func.grad(lambda p: F.cross_entropy(conv4(p, support, strided=True), support_labels))(params)
        fast = {name: p - alpha * inner[name] for name, p in params.items()}
        return F.cross_entropy(conv4(fast, query, strided=True), query_labels)

    return torch.func.vmap(adapted_query_loss)(x).mean()


def adam(params: Params, lr: float = 1e-3) -> torch.optim.Adam:
    on_cuda = next(iter(params.values())).is_cuda
    return torch.optim.Adam(params.values(), lr=lr, **({"fused": True} if on_cuda else {}))


def compiled(loss: Callable, compile: bool, device: torch.device) -> Callable:
    if compile and device.type != "cuda":
        raise ValueError("the minimal loop tries torch.compile on CUDA only")
    return torch.compile(loss) if compile else loss


def protonet_step(pool: TaskPool, ways: int, shots: int, queries: int, device: torch.device, compile: bool = False,
                  seed: int = 0) -> tuple[Callable[[], None], Callable[[], Tensor]]:
    """(one ProtoNet meta-step on one task, one episode's sampling: indices and gather)."""
    tasks, params = DeviceTasks(pool, seed), conv4_params(device, seed=seed)
    optimizer, loss_of, query_labels = adam(params), compiled(protonet_loss, compile, device), labels(ways, queries, device)

    def sample() -> Tensor:
        return pool.examples[tasks.draw(1, ways, shots + queries)]

    def step() -> None:
        loss = loss_of(params, sample(), shots, query_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, sample


def maml_step(pool: TaskPool, ways: int, shots: int, queries: int, tasks: int, device: torch.device,
              compile: bool = False, alpha: float = 0.4, seed: int = 0) -> tuple[Callable[[], None], Params]:
    """(one second-order MAML meta-step on `tasks` tasks, the parameters it trains)."""
    draws, params = DeviceTasks(pool, seed), conv4_params(device, ways=ways, seed=seed)
    optimizer, loss_of = adam(params), compiled(maml_loss, compile, device)
    support_labels, query_labels = labels(ways, shots, device), labels(ways, queries, device)

    def step() -> None:
        x = pool.examples[draws.draw(tasks, ways, shots + queries)]
        loss = loss_of(params, x, shots, alpha, support_labels, query_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, params
