"""The peer libraries, run on our tasks with our backbone: higher, torchopt (MAML) and easyfsl (ProtoNet).

They are benchmark extras (`pip install -e .[bench]`), never runtime
dependencies, and their code stays out of the repository: this module imports
them and writes the few lines each one's documentation shows for a meta-step.
Every workaround needed to import or run them is recorded in `NOTES` and
printed with the results, so a reader knows exactly what ran.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaflowlib.episodes import Episode, TaskPool

NOTES: list[str] = []


class PeerUnavailable(RuntimeError):
    """A peer library is not installed: the harness reports the row as missing instead of failing the run."""


def import_peer(name: str) -> types.ModuleType:
    """Import a peer, with the run-time workarounds it needs on this torch (each one noted)."""
    if name == "easyfsl":
        _ensure_torchvision()
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        raise PeerUnavailable(f"{name} is not installed ({error}); install the bench extra: pip install -e '.[bench]'") from None
    if name == "easyfsl":
        _allow_sampler_data_source()
    return module


def _ensure_torchvision() -> None:
    """easyfsl imports torchvision at module level; a torchvision built for another torch fails to import.

    Only ResNet blocks, ImageFolder and transforms are imported that way, none of
    which this benchmark uses, so a stub that raises on use is put in their place.
    """
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a broken build raises RuntimeError, a missing one ImportError
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        NOTES.append(f"torchvision failed to import ({type(error).__name__}: {str(error).splitlines()[0]}); "
                     "easyfsl ran against a stub torchvision (its ResNet/ImageFolder/transforms imports are unused here)")

        class Unusable:
            """Stands for any torchvision class or function; easyfsl subclasses some at import time."""

            def __init__(self, *args: object, **kwargs: object) -> None:
                raise RuntimeError("stub torchvision: not available in this benchmark environment")

        def any_name(attribute: str) -> type:
            if attribute.startswith("__"):  # __file__, __path__...: inspect and importlib must see a plain module
                raise AttributeError(attribute)
            return Unusable

        for module_name in ("torchvision", "torchvision.models", "torchvision.models.resnet", "torchvision.datasets",
                            "torchvision.transforms", "torchvision.utils"):
            stub = types.ModuleType(module_name)
            stub.__getattr__ = any_name  # type: ignore[attr-defined]
            sys.modules[module_name] = stub
        sys.modules["torchvision"].models = sys.modules["torchvision.models"]  # type: ignore[attr-defined]
        sys.modules["torchvision.models"].resnet = sys.modules["torchvision.models.resnet"]  # type: ignore[attr-defined]


def _allow_sampler_data_source() -> None:
    """easyfsl's TaskSampler calls `Sampler.__init__(data_source=None)`, an argument recent torch removed."""
    from torch.utils.data import Sampler

    if "data_source" in inspect.signature(Sampler.__init__).parameters:
        return
    NOTES.append(f"torch {torch.__version__}: Sampler.__init__ takes no data_source; it was patched to accept "
                 "and ignore the one easyfsl's TaskSampler passes")
    original = Sampler.__init__

    def accepting(self: Sampler, data_source: object = None) -> None:
        original(self)

    Sampler.__init__ = accepting  # type: ignore[method-assign]


def plain_conv4(in_channels: int = 1, hidden: int = 64, ways: int | None = None, layout: str = "maxpool") -> nn.Sequential:
    """Conv-4 as the peers' examples write it (nn.BatchNorm2d without running statistics), with an optional N-way head:
    max-pooled (ProtoNet's) or strided with features averaged over space (Finn et al.'s, the MAML family's).

    Its parameter names and shapes follow ours in order, so `load_weights_from` copies our initialization
    (both layouts have the same shapes: pass the layout ours was built with).
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(4):
        if layout == "maxpool":
            layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                       nn.ReLU(), nn.MaxPool2d(2)]
        else:
            layers += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU()]
        channels = hidden
    if layout != "maxpool":
        layers.append(nn.AdaptiveAvgPool2d(1))
    layers.append(nn.Flatten())
    if ways is not None:
        layers.append(nn.LazyLinear(ways))
    return nn.Sequential(*layers)


def load_weights_from(net: nn.Module, source: nn.Module, example: Tensor) -> nn.Module:
    """Copy `source`'s parameters, position by position, into `net` (materializing lazy layers on `example`)."""
    with torch.no_grad():
        net(example)
        ours, theirs = list(source.parameters()), list(net.parameters())
        if [p.shape for p in ours] != [p.shape for p in theirs]:
            raise ValueError(f"peer network shapes {[tuple(p.shape) for p in theirs]} differ from ours {[tuple(p.shape) for p in ours]}")
        for mine, peer in zip(ours, theirs):
            peer.copy_(mine)
    return net


def higher_maml_step(net: nn.Module, inner_lr: float, inner_steps: int, first_order: bool = False) -> Callable[[Episode], None]:
    """Accumulate the MAML meta-gradient of a task batch into `net`'s .grad, one task at a time (higher's MAML example)."""
    higher = import_peer("higher")
    inner_optimizer = torch.optim.SGD(net.parameters(), lr=inner_lr)

    def meta_gradient(episode: Episode) -> None:
        for i in range(episode.tasks):
            with higher.innerloop_ctx(net, inner_optimizer, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fnet, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.cross_entropy(fnet(episode.support_x[i]), episode.support_y[i]))
                query_loss = F.cross_entropy(fnet(episode.query_x[i]), episode.query_y[i])
                (query_loss / episode.tasks).backward()

    return meta_gradient


def torchopt_maml_step(net: nn.Module, inner_lr: float, inner_steps: int) -> Callable[[Episode], None]:
    """The same with torchopt's functional optimizer over a parameter dict (its functional MAML pattern)."""
    torchopt = import_peer("torchopt")
    inner = torchopt.sgd(lr=inner_lr)

    def meta_gradient(episode: Episode) -> None:
        for i in range(episode.tasks):
            params = dict(net.named_parameters())
            state = inner.init(params)
            for _ in range(inner_steps):
                loss = F.cross_entropy(functional_call(net, params, (episode.support_x[i],)), episode.support_y[i])
                grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
                updates, state = inner.update(dict(zip(params, grads)), state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            query_loss = F.cross_entropy(functional_call(net, params, (episode.query_x[i],)), episode.query_y[i])
            (query_loss / episode.tasks).backward()

    return meta_gradient


def easyfsl_protonet(backbone: nn.Module) -> nn.Module:
    import_peer("easyfsl")
    from easyfsl.methods import PrototypicalNetworks

    return PrototypicalNetworks(backbone)


def easyfsl_episodes(pool: TaskPool, ways: int, shots: int, queries: int, workers: int, pin_memory: bool) -> Iterator:
    """An endless stream of easyfsl episodes over `pool`'s examples (on the CPU), through its TaskSampler and a DataLoader."""
    import_peer("easyfsl")
    from easyfsl.datasets import FewShotDataset
    from easyfsl.samplers import TaskSampler
    from torch.utils.data import DataLoader

    examples = pool.examples.cpu()
    labels = torch.repeat_interleave(torch.arange(pool.num_classes), pool.counts).tolist()

    class PoolDataset(FewShotDataset):
        def __getitem__(self, item: int) -> tuple[Tensor, int]:
            return examples[item], labels[item]

        def __len__(self) -> int:
            return len(labels)

        def get_labels(self) -> list[int]:
            return labels

    dataset = PoolDataset()
    sampler = TaskSampler(dataset, n_way=ways, n_shot=shots, n_query=queries, n_tasks=10**9)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                        collate_fn=sampler.episodic_collate_fn, persistent_workers=workers > 0)
    return iter(loader)
