"""Test-time adaptation of a few-shot learner task by task (Omniglot-C)."""

from __future__ import annotations

import copy

import pytest
import torch

from metaflowlib.tta.fewshot import TaskModule, adapted_task_accuracies
from metaflowlib.episodes import fixed_episodes
from metaflowlib.evaluate import embed_pool, task_accuracies
from metaflowlib.methods import MAML, ParameterPredictor, ProtoNet

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_protonet(pool) -> ProtoNet:
    """A few meta-steps, so BatchNorm has non-trivial running statistics."""
    from metaflowlib.episodes import EpisodeSampler

    torch.manual_seed(0)
    method = ProtoNet(hidden=8)
    optimizer = torch.optim.Adam(method.parameters(), 1e-2)
    sampler = EpisodeSampler(pool, 5, 2, 3, 2, seed=0)
    method.train()
    for _ in range(5):
        optimizer.zero_grad()
        method.meta_gradient(next(sampler))
        optimizer.step()
    return method.eval()


def test_source_strategy_reproduces_the_standard_evaluation(tiny_pool):
    method = trained_protonet(tiny_pool)
    indices = fixed_episodes(tiny_pool, 6, 5, 2, 3, seed=1)
    adapted, seconds = adapted_task_accuracies(method, tiny_pool, indices, "source")
    assert torch.allclose(adapted, task_accuracies(method, embed_pool(method, tiny_pool, None), indices, 10, None), atol=1e-6) and seconds > 0


def test_bn_normalizes_with_the_tasks_own_images(tiny_pool):
    method = trained_protonet(tiny_pool)
    episode = tiny_pool.gather(fixed_episodes(tiny_pool, 1, 5, 2, 3, seed=2))
    model = TaskModule(method, episode.support_x[0], episode.support_y[0], 5)
    shifted = episode.query_x[0] * 0.3 + 0.5  # a contrast change
    from metaflowlib.tta.strategies import build_adapter

    source = build_adapter("source", model).predict(shifted)
    bn = build_adapter("bn", model).predict(shifted)
    expected = copy.deepcopy(method).train()  # batch statistics of support + query, no running statistics
    for layer in expected.modules():
        if hasattr(layer, "track_running_stats"):
            layer.track_running_stats, layer.running_mean, layer.running_var = False, None, None
    with torch.no_grad():
        z = expected.features(torch.cat([episode.support_x[0], shifted]))
        reference = expected.predict(expected.adapt(z[None, :10], episode.support_y[:1], 5), z[None, 10:])[0]
    assert torch.allclose(bn, reference, atol=1e-4) and not torch.allclose(bn, source, atol=1e-3)


@pytest.mark.parametrize("make", [lambda: ProtoNet(hidden=8), lambda: ParameterPredictor(hidden=8)])
def test_tent_changes_only_a_copy_and_only_batchnorm_affine(tiny_pool, make):
    torch.manual_seed(0)
    method = make().eval()
    before = copy.deepcopy(method.state_dict())
    indices = fixed_episodes(tiny_pool, 3, 5, 1, 3, seed=3)
    tent, _ = adapted_task_accuracies(method, tiny_pool, indices, "tent", steps=3)
    assert tent.shape == (3,)
    assert all(torch.equal(v, before[k]) for k, v in method.state_dict().items())  # the registered weights never move

    episode = tiny_pool.gather(indices.batches(1)[0])
    from metaflowlib.tta.strategies import TentAdapter

    adapter = TentAdapter(TaskModule(method, episode.support_x[0], episode.support_y[0], 5), steps=3,
                          optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    adapter.predict(episode.query_x[0])
    moved = {k for k, v in adapter.model.method.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert moved and all(k.endswith((".weight", ".bias")) and ".blocks." in k and k.split(".")[-2] in {"1", "5", "9", "13"} for k in moved)


def test_methods_with_their_own_inner_loop_are_refused(tiny_pool):
    episode = tiny_pool.gather(fixed_episodes(tiny_pool, 1, 5, 1, 3, seed=0))
    with pytest.raises(ValueError, match="adapts inside its own inner loop"):
        TaskModule(MAML(ways=5, hidden=8), episode.support_x[0], episode.support_y[0], 5)
