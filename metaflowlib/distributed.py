"""Data-parallel meta-training over processes started by torchrun: one process group, explicit collectives.

Each rank draws its share of the meta-batch (tasks_per_step / world size tasks, from seed + rank),
asks the method for the meta-gradient of that share, and the ranks average `.grad` with one
`all_reduce`. Not DDP: DDP's backward hooks do not mix with second-order inner loops
(`torch.func.grad` inside the forward), and Reptile and iMAML write `.grad` without any backward.
Averaging `.grad` after `meta_gradient` serves every method because each meta-loss is a mean over
tasks: the mean over W ranks of means over T/W tasks is the mean over the T tasks
(docs/distributed.md says when that is exact).

Imports torch alone (and the project's error type), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metaflowlib.errors import ConfigError


def launched() -> bool:
    """True in a process that torchrun (or any env:// launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(script: str | Path, args: Sequence[str], nproc_per_node: int) -> list[str]:
    """argv running `script args` on nproc_per_node local processes; --standalone picks a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            str(script), *args]


def relaunch(script: str | Path, args: Sequence[str], nproc_per_node: int, tasks_per_step: int, name: str) -> NoReturn:
    """Become torchrun running `script args` on nproc_per_node processes: the same process, so the signals DVC or a
    user sends reach torchrun, which forwards them to every rank. An uneven meta-batch is refused once, up front."""
    shard_tasks(tasks_per_step, nproc_per_node, name)
    sys.stdout.flush()
    sys.stderr.flush()
    command = torchrun_command(Path(script).resolve(), args, nproc_per_node)
    os.execv(command[0], command)


def shard_tasks(tasks_per_step: int, world_size: int, name: str = "tasks_per_step") -> int:
    """Tasks per rank: `tasks_per_step` is the global meta-batch, split evenly (equal shares keep the mean exact)."""
    if tasks_per_step % world_size:
        raise ConfigError(f"{name} = {tasks_per_step} is the global meta-batch and must divide by the {world_size} "
                          f"training processes; set it to a multiple of {world_size} or change the number of processes "
                          "(train.launcher.nproc_per_node, or torchrun's --nnodes x --nproc_per_node)")
    return tasks_per_step // world_size


def synchronized(module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """What the ranks average each step: the trainable parameters (their `.grad`) and the floating-point
    buffers of modules in training mode, which a forward may move (BatchNorm running statistics)."""
    params = [p for p in module.parameters() if p.requires_grad]
    buffers = [b for m in module.modules() if m.training for b in m.buffers(recurse=False) if b.is_floating_point()]
    return params, buffers


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group, and the few collectives meta-training needs.

    Every rank must make the same calls in the same order (they are collectives);
    `MetaTrainer` does so when every rank constructs it with the same arguments.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # where this rank computes and where collective buffers live (NCCL: its GPU)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, validates and writes files."""
        return self.rank == 0

    def shard(self, tasks_per_step: int, name: str = "tasks_per_step") -> int:
        return shard_tasks(tasks_per_step, self.world_size, name)

    def average_gradients(self, module: nn.Module, scalars: Sequence[float] = ()) -> list[float]:
        """Average, over ranks and in one all_reduce: what `synchronized` lists, and `scalars`.

        Each rank's forward moved its own BatchNorm running statistics; averaging them keeps
        omega identical on every rank. A parameter with a gradient on some ranks only counts
        as zero on the others; with none anywhere it keeps None.
        Returns the averaged scalars (e.g. the step's loss and accuracy).
        """
        params, buffers = synchronized(module)
        dtype, device = params[0].dtype, params[0].device
        flags = [float(p.grad is not None) for p in params]
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        pieces += [b.reshape(-1) for b in buffers]
        pieces.append(torch.tensor(flags + [float(s) for s in scalars], dtype=dtype, device=device))
        flat = torch.cat([piece.to(dtype) for piece in pieces])
        dist.all_reduce(flat)
        flat /= self.world_size
        *chunks, anywhere, averaged = flat.split([t.numel() for t in params + buffers] + [len(params), len(scalars)])
        for p, chunk, has_grad in zip(params, chunks, anywhere.tolist()):
            if not has_grad:
                p.grad = None
            elif p.grad is None:
                p.grad = chunk.view_as(p).to(p.dtype).clone()
            else:
                p.grad.copy_(chunk.view_as(p))
        for b, chunk in zip(buffers, chunks[len(params) :]):
            b.copy_(chunk.view_as(b))
        return averaged.tolist()

    def any_signal(self, signal_number: int | None) -> int | None:
        """The stop signal any rank received (the largest number), so all ranks stop at the same step."""
        value = torch.tensor([signal_number or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value) or None

    def slowest(self, seconds: float) -> float:
        """The longest of the ranks' times: a synchronous step lasts that long, and a seconds budget
        decided on it is decided identically everywhere."""
        value = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value)

    def from_main(self, compute: Callable[[], float]) -> float:
        """`compute()` on rank 0 only, its value on every rank (validation runs once, decisions agree)."""
        value = torch.tensor([compute() if self.is_main else 0.0], dtype=torch.float64, device=self.device)
        dist.broadcast(value, 0)
        return float(value)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's object (e.g. the checkpoint it alone read) on every rank."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, 0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's module (the same omega to start from)."""
        with torch.no_grad():
            for tensor in module.state_dict().values():
                buffer = tensor.contiguous()  # channels_last weights: gloo sends contiguous memory only
                dist.broadcast(buffer, 0)
                if buffer is not tensor:
                    tensor.copy_(buffer)

    def gather(self, tensor: Tensor) -> Tensor:
        """[world_size, *shape]: every rank's `tensor`, stacked in rank order, on tensor's device."""
        local = tensor.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.stack(parts).to(tensor.device)


def init_from_env(device: torch.device) -> Distributed | None:
    """Join the group torchrun described in the environment; None outside torchrun or for one process.

    gloo on CPU, NCCL on CUDA (each rank on GPU LOCAL_RANK of its node).
    """
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank, device)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
