"""bench/maml_parity.py's two sides compute the same thing: ours and the higher peer stay together in float64."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from metaflowlib.episodes import EpisodeSampler, TaskPool

ROOT = Path(__file__).resolve().parent.parent
STEPS, TASKS, SHOTS, QUERIES = 3, 2, 1, 3


def load_bench() -> ModuleType:
    """Import the script by path (bench/ is not a package); registered first so its dataclass resolves."""
    spec = importlib.util.spec_from_file_location("bench_maml_parity", ROOT / "bench" / "maml_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture(scope="module")
def pool() -> TaskPool:
    """8 classes of 6 random float64 images: the check is about arithmetic, not learning."""
    generator = torch.Generator().manual_seed(0)
    examples = torch.rand(48, 1, 28, 28, generator=generator, dtype=torch.float64)
    return TaskPool(examples, torch.arange(8).repeat_interleave(6), name="synthetic")


def build(kind: str):
    return bench.build_pair(kind, seed=0, inner_lr=0.4, outer_lr=1e-3, method_kwargs={}, dtype=torch.float64)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters()))


def trained(kind: str, pool: TaskPool):
    pair = build(kind)
    samplers = [EpisodeSampler(pool, bench.WAYS, SHOTS, QUERIES, tasks=TASKS, seed=0) for _ in range(2)]
    bench.train(pair, *samplers, STEPS)
    return pair


@pytest.fixture(scope="module")
def pairs(pool: TaskPool, one_thread: None) -> dict:
    return {kind: trained(kind, pool) for kind in bench.KINDS}


@pytest.mark.parametrize("kind", ["maml", "fomaml"])
def test_ours_and_higher_agree_after_meta_steps(pairs: dict, kind: str) -> None:
    pair = pairs[kind]
    assert max_difference(pair.peer, build(kind).peer) > 1e-3  # both moved: not two untouched copies
    assert bench.max_parameter_difference(pair) < 1e-4


def test_first_order_differs_from_second_order(pairs: dict) -> None:
    assert max_difference(pairs["maml"].method.net, pairs["fomaml"].method.net) > 1e-3
    assert max_difference(pairs["maml"].peer, pairs["fomaml"].peer) > 1e-3


def test_literal_higher_first_order_idiom_leaves_the_initialization_without_gradient(pool: TaskPool, one_thread: None) -> None:
    """Why the peer takes FOMAML's gradient from the fast weights (bench docstring): if higher changes, revisit it."""
    pair = build("fomaml")
    episode = next(EpisodeSampler(pool, bench.WAYS, SHOTS, QUERIES, tasks=1, seed=0))
    assert not bench.higher_first_order_reaches_init(pair.peer, 0.4, episode)


def test_a_peer_of_another_layout_is_refused_though_every_shape_matches() -> None:
    """The guard that keeps the bench from comparing two different networks whose parameters copy cleanly."""
    method = build("maml").method
    other = next(layout for layout in bench.LAYOUTS if layout != bench.peer_layout(method))
    peer = bench.peer_network(other).double()
    bench.copy_parameters(method.net, peer)
    with pytest.raises(ValueError, match="another function"):
        bench.check_same_function(method.net, peer, method.config())
