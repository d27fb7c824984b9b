"""Tasks T_i = (D_i^t, D_i^v, L_i) sampled by index arithmetic.

A split lives on the device as one tensor of examples sorted by class
(`TaskPool`). Sampling a batch of N-way K-shot Q-query tasks is a handful of
tensor ops on indices: no per-image Python work, no DataLoader. Evaluation
indices are drawn on the CPU from a seeded generator, so the same seed gives
the same tasks on every device and evaluation episodes are identical across
methods. A training stream on a CUDA pool draws on the GPU instead, with a
generator there (`TaskPool.sample_indices_on_device`): no host round trip per
episode, at the price of a stream that differs from the CPU one for one seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from metaflowlib.errors import DataError


@dataclass(frozen=True)
class Episode:
    """A batch of T tasks. Labels are 0..N-1, assigned to classes in random order.

    support_x: [T, N*K, ...]   D_i^t inputs (images or per-example features)
    support_y: [T, N*K]        class-major: label of position j is j // K
    query_x:   [T, N*Q, ...]   D_i^v inputs
    query_y:   [T, N*Q]
    embedded:  the inputs are features of a pool embedded once (by a frozen feature map)
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int
    embedded: bool = False

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    def split(self, size: int) -> list[Episode]:
        """Consecutive batches of at most `size` tasks (to accumulate a meta-gradient chunk by chunk)."""
        return [
            Episode(self.support_x[i : i + size], self.support_y[i : i + size], self.query_x[i : i + size],
                    self.query_y[i : i + size], self.ways, self.embedded)
            for i in range(0, self.tasks, size)
        ]


@dataclass(frozen=True)
class EpisodeIndices:
    """Positions into a TaskPool's example tensor (kept separate so they can be hashed and reused)."""

    support: Tensor  # [T, N*K] long
    query: Tensor  # [T, N*Q] long
    ways: int
    shots: int
    queries: int

    def digest(self) -> str:
        """SHA-256 of the task indices: equal digests mean every method saw the same tasks."""
        digest = hashlib.sha256(f"{self.ways},{self.shots},{self.queries}".encode())
        digest.update(self.support.cpu().numpy().tobytes())
        digest.update(self.query.cpu().numpy().tobytes())
        return digest.hexdigest()

    def batches(self, size: int) -> list[EpisodeIndices]:
        """Split into consecutive batches of at most `size` tasks."""
        return [
            EpisodeIndices(self.support[i : i + size], self.query[i : i + size], self.ways, self.shots, self.queries)
            for i in range(0, self.support.shape[0], size)
        ]


class TaskPool:
    """A class-disjoint split: examples [M, ...] sorted so each class is contiguous.

    Args:
        examples: [M, ...] tensor (model-ready images, or features).
        labels: [M] class id of each example (any integers).
        name: used in error messages ("train", "test", ...).
    """

    def __init__(self, examples: Tensor, labels: Tensor, name: str = "split") -> None:
        if examples.shape[0] != labels.shape[0]:
            raise DataError(f"{name}: {examples.shape[0]} examples but {labels.shape[0]} labels")
        if examples.shape[0] == 0:
            raise DataError(f"{name}: the split is empty")
        order = torch.argsort(labels.cpu(), stable=True)
        sorted_labels = labels.cpu()[order]
        self.classes, self.counts = torch.unique_consecutive(sorted_labels, return_counts=True)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.examples = examples[order.to(examples.device)]
        self.name = name
        self.embedded = False
        self.layouts: dict[tuple[str, int, int], DeviceLayout] = {}

    @property
    def num_classes(self) -> int:
        return int(self.classes.numel())

    def with_examples(self, examples: Tensor) -> TaskPool:
        """The same class layout over per-example features of the examples (episodes say `embedded`)."""
        pool = object.__new__(TaskPool)
        pool.classes, pool.counts, pool.offsets, pool.name = self.classes, self.counts, self.offsets, self.name
        pool.examples, pool.embedded, pool.layouts = examples, True, {}
        return pool

    def check(self, ways: int, shots: int, queries: int) -> Tensor:
        """Classes that can supply shots+queries examples; raise if fewer than `ways`."""
        if ways < 2 or shots < 1 or queries < 1:
            raise DataError(f"{name_shape(ways, shots, queries)}: ways must be >= 2, shots and queries >= 1")
        eligible = torch.nonzero(self.counts >= shots + queries).flatten()
        if eligible.numel() < ways:
            raise DataError(
                f"cannot sample {name_shape(ways, shots, queries)} tasks from the '{self.name}' split: "
                f"only {eligible.numel()} of {self.num_classes} classes have >= {shots + queries} examples "
                f"(largest class has {int(self.counts.max())})"
            )
        return eligible

    def sample_indices(
        self, tasks: int, ways: int, shots: int, queries: int, generator: torch.Generator
    ) -> EpisodeIndices:
        eligible = self.check(ways, shots, queries)
        # classes: a random subset of size N per task, in random order -> label j is position j
        keys = torch.rand(tasks, eligible.numel(), generator=generator)
        chosen = eligible[keys.argsort(dim=1)[:, :ways]]  # [T, N]
        counts = self.counts[chosen]  # [T, N]
        # examples: K+Q distinct positions per chosen class; padding positions sort last
        width = int(counts.max())
        draws = torch.rand(tasks, ways, width, generator=generator)
        draws = draws.masked_fill(torch.arange(width) >= counts[..., None], 2.0)
        picks = draws.argsort(dim=2)[..., : shots + queries]  # [T, N, K+Q]
        positions = self.offsets[chosen][..., None] + picks
        support = positions[..., :shots].reshape(tasks, ways * shots)
        query = positions[..., shots:].reshape(tasks, ways * queries)
        return EpisodeIndices(support, query, ways, shots, queries)

    def sample_indices_on_device(
        self, tasks: int, ways: int, shots: int, queries: int, generator: torch.Generator
    ) -> EpisodeIndices:
        """The distribution of `sample_indices`, drawn where `generator` lives, with no host sync: the class layout is
        copied there once per shape, and every class draws from the widest eligible class's width (`sample_indices`
        reads the widest chosen class back to the host). The same seed gives other tasks than `sample_indices`."""
        layout = self.layout_on(generator.device, ways, shots, queries)
        device = generator.device
        keys = torch.rand(tasks, layout.eligible.numel(), generator=generator, device=device)
        chosen = layout.eligible[keys.argsort(dim=1)[:, :ways]]  # [T, N]
        draws = torch.rand(tasks, ways, layout.width, generator=generator, device=device)
        if not layout.uniform:  # padding positions of the smaller classes sort last
            draws = draws.masked_fill(layout.positions >= layout.counts[chosen][..., None], 2.0)
        picks = draws.argsort(dim=2)[..., : shots + queries]  # [T, N, K+Q]
        positions = layout.offsets[chosen][..., None] + picks
        support = positions[..., :shots].reshape(tasks, ways * shots)
        query = positions[..., shots:].reshape(tasks, ways * queries)
        return EpisodeIndices(support, query, ways, shots, queries)

    def layout_on(self, device: torch.device, ways: int, shots: int, queries: int) -> DeviceLayout:
        """The eligible classes' layout on `device`: checked and copied once per (device, shape)."""
        key = (str(device), ways, shots + queries)
        if key not in self.layouts:
            eligible = self.check(ways, shots, queries)
            counts = self.counts[eligible]
            width = int(counts.max())
            self.layouts[key] = DeviceLayout(eligible.to(device), self.counts.to(device), self.offsets.to(device),
                                             torch.arange(width, device=device), width, bool(counts.min() == width))
        return self.layouts[key]

    def gather(self, indices: EpisodeIndices) -> Episode:
        """Materialize tasks on the pool's device."""
        device = self.examples.device
        t, ways, shots, queries = indices.support.shape[0], indices.ways, indices.shots, indices.queries
        support_y = (torch.arange(ways * shots, device=device) // shots).expand(t, -1)  # 0..0 1..1 ...: no host sync
        query_y = (torch.arange(ways * queries, device=device) // queries).expand(t, -1)
        return Episode(
            support_x=self.examples[indices.support.to(device)],
            support_y=support_y,
            query_x=self.examples[indices.query.to(device)],
            query_y=query_y,
            ways=indices.ways,
            embedded=self.embedded,
        )


@dataclass(frozen=True)
class DeviceLayout:
    """A pool's class layout on one device, for one task shape: what `TaskPool.sample_indices_on_device` reads."""

    eligible: Tensor  # [C'] classes with >= K+Q examples
    counts: Tensor  # [C] examples per class
    offsets: Tensor  # [C] first position of each class
    positions: Tensor  # [width] 0..width-1
    width: int  # the largest eligible class
    uniform: bool  # every eligible class has `width` examples (Omniglot: 20): no padding to mask


def name_shape(ways: int, shots: int, queries: int) -> str:
    return f"{ways}-way {shots}-shot {queries}-query"


class EpisodeSampler:
    """An endless stream of task batches from one pool, reproducible from `seed`.

    Args:
        on_device: draw the indices where the pool is, with a generator there and no host sync
            (`TaskPool.sample_indices_on_device`; another stream than the CPU's for one seed).
            None (default): on a CUDA pool only, so a CPU pool's stream stays the CPU one. True on a
            CPU pool runs the same code on the CPU (the tests do).
    """

    def __init__(self, pool: TaskPool, ways: int, shots: int, queries: int, tasks: int = 1, seed: int = 0,
                 on_device: bool | None = None) -> None:
        pool.check(ways, shots, queries)
        self.pool, self.ways, self.shots, self.queries, self.tasks = pool, ways, shots, queries, tasks
        device = pool.examples.device
        self.on_device = device.type == "cuda" if on_device is None else on_device
        self.generator = torch.Generator(device if self.on_device else "cpu").manual_seed(seed)

    def __next__(self) -> Episode:
        draw = self.pool.sample_indices_on_device if self.on_device else self.pool.sample_indices
        return self.pool.gather(draw(self.tasks, self.ways, self.shots, self.queries, self.generator))

    def __iter__(self) -> EpisodeSampler:
        return self

    def state(self) -> Tensor:
        return self.generator.get_state()

    def load_state(self, state: Tensor) -> None:
        if state.numel() != self.generator.get_state().numel():
            where = f"a {self.generator.device.type} generator"
            raise DataError(f"the saved task stream does not fit {where} (state of {state.numel()} bytes, "
                            f"expected {self.generator.get_state().numel()}): resume on the device it was written on, "
                            "or delete the checkpoint to start afresh")
        self.generator.set_state(state)


def fixed_episodes(pool: TaskPool, n: int, ways: int, shots: int, queries: int, seed: int) -> EpisodeIndices:
    """The evaluation protocol's tasks: a pure function of (pool layout, shape, seed)."""
    generator = torch.Generator().manual_seed(seed)
    return pool.sample_indices(n, ways, shots, queries, generator)
