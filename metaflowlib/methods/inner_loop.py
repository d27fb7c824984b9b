"""The functional inner loop shared by the optimization-based methods (MAML, FOMAML, Reptile, iMAML).

omega   = an initialization theta (a backbone, Conv-4 by default, + linear N-way head), the lecture's theta_0.
theta_i = theta after a few inner-optimizer steps on task i's support loss L(theta, D_i^t).

Parameters are plain dicts {name: Tensor} run through `torch.func.functional_call`;
inner gradients come from `torch.func.grad`, which stays differentiable, so the
outer `backward()` reaches theta through every inner step (second-order MAML)
unless the inner gradients are detached (first order). The meta-batch is mapped
with `torch.func.vmap` (one batched computation, optionally in chunks) or a
per-task Python loop; both run the same per-task function.

BatchNorm has `track_running_stats=False`: statistics are those of each
task's own batch (transductive, as in Finn et al. 2017). Under vmap it is the
composite kernel, whose second derivatives are correct there (see
models/batchnorm.py); the per-task loop uses the fused one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metaflowlib.methods.base import MetaLearner
from metaflowlib.models.backbones import BackboneSpec, backbone_spec, build_backbone, output_dim
from metaflowlib.models.conv4 import Layout
from metaflowlib.models.batchnorm import BatchNorm2d
from metaflowlib.methods.inner_optimizers import SGD, InnerOptimizer

Params = dict[str, Tensor]
Vectorize = Literal["auto", "vmap", "loop"]
VECTORIZE_MODES = ("auto", "vmap", "loop")
HeadInit = Literal["normal", "zeros"]
HEAD_INITS = ("normal", "zeros")


def resolve_vectorize(vectorize: Vectorize, device: torch.device) -> Literal["vmap", "loop"]:
    """Resolve "auto": vmap on CUDA, the per-task loop elsewhere.

    On CPU vmap took 1.47x the loop's time and 1.30x its peak memory (second-order MAML,
    5 inner steps, 4 tasks, 1 thread; bench/maml_memory.py).
    """
    if vectorize not in VECTORIZE_MODES:
        raise ValueError(f"vectorize must be one of {VECTORIZE_MODES}, got {vectorize!r}")
    if vectorize == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return vectorize


def map_tasks(
    fn: Callable[..., Any],
    *args: Any,
    in_dims: tuple[int | None, ...],
    mode: Literal["vmap", "loop"],
    chunk_size: int | None = None,
) -> Any:
    """fn over the task dimension: args with in_dim 0 are batched [T, ...], None are shared.

    Outputs (tensors, dicts and tuples of them) are stacked along a new dim 0.
    `chunk_size` bounds how many tasks vmap materializes at once; the loop is chunk size 1.
    """
    if mode == "vmap":
        return vmap(fn, in_dims=in_dims, chunk_size=chunk_size, randomness="different")(*args)  # dropout: per task
    tasks = next(_leading_dim(a) for a, d in zip(args, in_dims) if d == 0)
    return _stack([fn(*(a if d is None else _index(a, i) for a, d in zip(args, in_dims))) for i in range(tasks)])


def inner_loop(
    loss: Callable[[Params, Tensor, Tensor], Tensor],
    theta: Params,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    optimizer: InnerOptimizer,
    first_order: bool = False,
    proximal: float = 0.0,
    batch_size: int | None = None,
    mode: Literal["vmap", "loop"] = "loop",
    chunk_size: int | None = None,
) -> Params:
    """theta_i for every task: `steps` optimizer steps on loss(phi, x_i, y_i) from the shared theta.

    Args:
        loss: per-task loss(params, x [S, ...], y [S]) -> scalar.
        theta: the shared initialization (unbatched).
        x, y: [T, S, ...] and [T, S].
        first_order: run the inner steps from a detached theta and add their update as a
            constant (FOMAML, Finn et al. 2017 sec. 5.2): the outer gradient skips the
            Hessian terms and autograd records nothing of the inner loop.
        proximal: lambda of iMAML's inner objective L(phi) + lambda/2 ||phi - theta||^2
            (Rajeswaran et al. 2019); 0 for MAML and Reptile.
        batch_size: examples per step, taken in order and cycling (Reptile's inner mini-batches,
            Nichol et al.'s `inner_batch`); None: every step sees all S examples.

    Returns: {name: [T, *shape]}. Differentiable w.r.t. theta when autograd is on;
    inner gradients come from `torch.func.grad`, which works under `torch.no_grad()`.
    """

    def objective(phi: Params, anchor: Params, x_i: Tensor, y_i: Tensor) -> Tensor:
        value = loss(phi, x_i, y_i)
        if proximal:
            value = value + proximal / 2 * sum((phi[k] - anchor[k]).pow(2).sum() for k in phi)
        return value

    def one_task(theta: Params, x_i: Tensor, y_i: Tensor) -> Params:
        start = {k: p.detach() for k, p in theta.items()} if first_order else theta
        phi, state = dict(start), optimizer.init(start)
        for step in range(steps):
            xb, yb = x_i, y_i
            if batch_size is not None and batch_size < x_i.shape[0]:
                batch = (torch.arange(batch_size, device=x_i.device) + step * batch_size) % x_i.shape[0]
                xb, yb = x_i[batch], y_i[batch]
            grads = grad(objective)(phi, start, xb, yb)
            phi, state = optimizer.step(phi, grads, state)
        if first_order:  # theta + (theta_i - theta) with the update held constant: d theta_i / d theta = I
            return {k: theta[k] + (phi[k] - start[k]) for k in phi}
        return phi

    return map_tasks(one_task, theta, x, y, in_dims=(None, 0, 0), mode=mode, chunk_size=chunk_size)


class InitializationLearner(MetaLearner):
    """Base of the methods whose meta-knowledge is an initialization theta of a backbone (Conv-4 by default) + linear head.

    Always fp32 (`autocast_safe = False`): inner-loop gradients, and MAML's second
    derivatives through them, are not trusted to bf16.

    The head has `ways` outputs, so N is fixed at construction. `head_init` chooses how it starts:
    - "zeros" (default): every class has the same logit under theta, the right prior when labels are
      assigned to classes in random order per task (the "zeroing trick", Kao et al. ICLR 2022); the
      first inner step sets row k to a centred prototype.
    - "normal": weight ~ N(0, 1), bias 0, as Finn et al.'s reference code (cbfinn/maml, maml.py:
      `w5 = tf.random_normal(...)`, `b5 = tf.zeros`) and learn2learn's OmniglotCNN.
    Whether first-order MAML's d theta_i / d theta ~ I holds depends on the features more than on the
    head: on the max-pooled Conv-4 (|E f|^2 ~ 60) alpha * lambda_max(H_head) is 5.4 at alpha 0.4, I - alpha H
    has eigenvalues near -4.4, and first-order MAML's head gradient points against second-order MAML's
    (cosine -0.96 for the bias); on Finn et al.'s strided Conv-4 (|E f|^2 ~ 9) it is 0.8 and the zero head
    gives the better agreement (cosine 0.5-0.6 over omega; 0.05 with the N(0, 1) head, whose saturated
    wrong logits make the head-body cross terms large). bench/results/maml_family_diagnostics/.

    `inner_optimizer` (default SGD(inner_lr), Finn et al. eq. 1) can be replaced by any
    `metaflowlib.learned_optimizer.InnerOptimizer` (init/step over parameter dicts), e.g. the
    learned LSTM optimizer at test time.

    Args (shared by every subclass):
        ways: N, the head size; episodes with another N are refused.
        in_channels, image_size: the images' channels and side (set by the data; the head's input size follows).
        hidden: Conv-4's width (backbone conv4 only).
        backbone: "conv4" (default), "resnet12" or a spec mapping (models/backbones.py); its BatchNorm is
            transductive, and vmap-safe when vectorized (an imported module's nn.BatchNorm2d is swapped for it).
        inner_steps: inner steps during meta-training (`self.training`).
        inner_steps_eval: inner steps at evaluation (`eval()` mode).
        inner_lr: alpha, the inner SGD step size.
        head_init: "normal" or "zeros" (above).
        layout: Conv-4's "strided" layout (Finn et al.'s, Nichol et al.'s and Rajeswaran et al.'s Omniglot
            network; the default) or the "maxpool" one of ProtoNet (models/conv4.py).
        vectorize: "vmap", "loop", or "auto" (vmap on CUDA, loop on CPU).
        chunk_size: tasks per vmap chunk (None: the whole meta-batch); trades speed for memory (MAML and
            FOMAML also backpropagate chunk by chunk, so their meta-step's graph is one chunk's).
    """

    autocast_safe = False
    transductive = True  # BatchNorm normalizes with each task's own batch statistics
    legacy_defaults = {"layout": "maxpool", "head_init": "zeros"}
    # Finn et al.'s 5-way 1-shot Omniglot: meta-batch 32, 60000 meta-iterations
    block_defaults = {"ways": 5, "shots": 1, "queries": 15, "tasks_per_step": 32,
                      "budget": {"default": {"episodes": 1000}, "full": {"episodes": 60000}}}

    def __init__(
        self,
        *,
        ways: int,
        in_channels: int,
        hidden: int,
        image_size: int,
        inner_steps: int,
        inner_steps_eval: int,
        inner_lr: float,
        head_init: HeadInit,
        layout: Layout,
        vectorize: Vectorize,
        chunk_size: int | None,
        backbone: BackboneSpec = "conv4",
        **method_config: Any,
    ) -> None:
        if ways < 2:
            raise ValueError(f"ways must be >= 2 (the head has one output per class), got {ways}")
        if inner_steps < 1 or inner_steps_eval < 1:
            raise ValueError(f"inner_steps and inner_steps_eval must be >= 1, got {inner_steps} and {inner_steps_eval}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr (alpha) must be > 0, got {inner_lr}")
        if vectorize not in VECTORIZE_MODES:
            raise ValueError(f"vectorize must be one of {VECTORIZE_MODES}, got {vectorize!r}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
        super().__init__(
            ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size,
            inner_steps=inner_steps, inner_steps_eval=inner_steps_eval, inner_lr=inner_lr, head_init=head_init,
            layout=layout, vectorize=vectorize, chunk_size=chunk_size, backbone=backbone_spec(backbone), **method_config,
        )
        self.ways, self.in_channels, self.image_size = ways, in_channels, image_size
        self.inner_steps, self.inner_steps_eval, self.inner_lr = inner_steps, inner_steps_eval, inner_lr
        self.vectorize, self.chunk_size, self.head_init = vectorize, chunk_size, head_init
        head = nn.Linear(output_dim(backbone, in_channels, image_size, hidden=hidden, layout=layout), ways)
        if head_init == "normal":
            nn.init.normal_(head.weight, std=1.0)
        else:
            nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        body = build_backbone(backbone, in_channels, hidden=hidden, layout=layout, composite_bn=True, track_running_stats=False)
        self.net = nn.Sequential(body, head)
        self.inner_optimizer: InnerOptimizer = SGD(inner_lr)

    @property
    def fixed_ways(self) -> int:
        return self.ways

    def omega(self) -> Params:
        """omega: the meta-learned initialization as a functional parameter dict (live parameters, not copies);
        each task's theta_i starts from it."""
        return dict(self.net.named_parameters())

    def task_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """L(params, D) for one task: mean cross-entropy of x [S, C, H, W] against y [S]."""
        return F.cross_entropy(functional_call(self.net, params, (x,)), y)

    def fine_tune(
        self, theta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool, proximal: float = 0.0,
        batch_size: int | None = None,
    ) -> Params:
        """`inner_loop` from theta on this method's network, optimizer and vectorization."""
        return inner_loop(
            self.task_loss, theta, self._inputs(x), y, steps=steps, optimizer=self.inner_optimizer,
            first_order=first_order, proximal=proximal, batch_size=batch_size, mode=self._mode(x),
            chunk_size=self.chunk_size,
        )

    def predict(self, theta: Params, query_x: Tensor) -> Tensor:
        """Logits [T, Q, N] of each task's query set under its own theta_i (query batch statistics)."""

        def forward(params: Params, x: Tensor) -> Tensor:
            return functional_call(self.net, params, (x,))

        return map_tasks(
            forward, theta, self._inputs(query_x), in_dims=(0, 0), mode=self._mode(query_x), chunk_size=self.chunk_size
        )

    def adaptation_steps(self) -> int:
        """k during meta-training, k' at evaluation."""
        return self.inner_steps if self.training else self.inner_steps_eval

    def check_ways(self, ways: int) -> None:
        if ways != self.ways:
            raise ValueError(
                f"{self.kind} was built with a {self.ways}-way head but the episode is {ways}-way; "
                f"build the method with ways={ways} or sample {self.ways}-way episodes"
            )

    def _inputs(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 5 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"{self.kind} expects images [T, S, {', '.join(map(str, expected))}] "
                f"(in_channels={self.in_channels}, image_size={self.image_size}), got {list(x.shape)}; "
                "set in_channels/image_size in the method params to match the data"
            )
        return x.to(self.net[1].weight.dtype)

    def _mode(self, x: Tensor) -> Literal["vmap", "loop"]:
        """The task mapping for x's device, with the batch-norm kernel it needs.

        Only vmap needs the composite batch norm (its second derivatives are wrong
        under vmap with the native op); the per-task loop takes the fused kernel,
        which on CPU made a second-order MAML meta-step 1.7x faster (bench/).
        """
        mode = resolve_vectorize(self.vectorize, x.device)
        for module in self.net.modules():
            if isinstance(module, BatchNorm2d):
                module.composite = mode == "vmap"
        return mode


def _leading_dim(arg: Any) -> int:
    return next(iter(arg.values())).shape[0] if isinstance(arg, dict) else arg.shape[0]


def _index(arg: Any, i: int) -> Any:
    return {k: v[i] for k, v in arg.items()} if isinstance(arg, dict) else arg[i]


def _stack(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, Tensor):
        return torch.stack(items)
    if isinstance(first, dict):
        return {k: _stack([item[k] for item in items]) for k in first}
    if isinstance(first, tuple):
        return tuple(_stack(list(column)) for column in zip(*items))
    raise TypeError(f"map_tasks outputs must be tensors, dicts or tuples of them, got {type(first).__name__}")
