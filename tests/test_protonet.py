import pytest
import torch
import torch.nn.functional as F

from metaflowlib.episodes import EpisodeSampler, fixed_episodes
from metaflowlib.evaluate import embed_pool, evaluate_setting, task_accuracies
from metaflowlib.methods import ProtoNet


def test_prototypes_are_class_means():
    method = ProtoNet()
    z = torch.randn(2, 6, 4)
    y = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    prototypes = method.adapt(z, y, 3)
    for t in range(2):
        for k in range(3):
            assert torch.allclose(prototypes[t, k], z[t][y[t] == k].mean(0), atol=1e-6)


def test_logits_are_negative_squared_distances():
    method = ProtoNet()
    prototypes, queries = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    expected = -torch.cdist(queries, prototypes).pow(2)
    assert torch.allclose(method.predict(prototypes, queries), expected, atol=1e-5)


def test_cosine_distance_option():
    method = ProtoNet(distance="cosine", temperature=2.0)
    prototypes, queries = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    expected = 2.0 * F.cosine_similarity(queries[0, :, None], prototypes[0, None], dim=-1)
    assert torch.allclose(method.predict(prototypes, queries)[0], expected, atol=1e-5)


def test_meta_training_lowers_query_loss(tiny_pool):
    torch.manual_seed(0)
    method = ProtoNet(hidden=16)
    sampler = EpisodeSampler(tiny_pool, 5, 1, 3, tasks=2, seed=0)
    fixed = next(EpisodeSampler(tiny_pool, 5, 1, 3, tasks=8, seed=99))
    method.train()
    before = float(method.meta_loss(fixed)[0].detach())
    optimizer = torch.optim.Adam(method.parameters(), 1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        method.meta_gradient(next(sampler))
        optimizer.step()
    after = float(method.meta_loss(fixed)[0].detach())
    assert after < 0.5 * before


def test_cached_features_give_the_same_accuracies_as_raw_images(tiny_pool):
    torch.manual_seed(0)
    method = ProtoNet(hidden=8).eval()
    indices = fixed_episodes(tiny_pool, 10, 5, 2, 3, seed=1)
    raw = []
    with torch.no_grad():
        for t in range(10):
            episode = tiny_pool.gather(indices.batches(1)[t])
            s = method.features(episode.support_x[0])[None]
            q = method.features(episode.query_x[0])[None]
            logits = method.predict(method.adapt(s, episode.support_y, 5), q)
            raw.append(float((logits.argmax(-1) == episode.query_y).float().mean()))
    cached = task_accuracies(method, embed_pool(method, tiny_pool, None), indices, 4, None)
    assert torch.allclose(cached, torch.tensor(raw))


def test_evaluate_setting_scores_the_fixed_tasks_on_the_features_given(tiny_pool):
    """Features that put a class on one point score every query right, with no spread over tasks; features that are
    all equal tie every distance, argmax picks class 0, and exactly the 3 of 15 queries of class 0 count."""
    method = ProtoNet(hidden=8).eval()
    labels = torch.repeat_interleave(torch.arange(tiny_pool.num_classes), tiny_pool.counts)  # the pool is class-sorted
    separable = tiny_pool.with_examples(10 * F.one_hot(labels).float())
    result = evaluate_setting(method, tiny_pool, separable, 5, 1, 3, 40, 0, 16, None)
    assert (result.accuracy, result.ci95, result.episodes) == (1.0, 0.0, 40)
    assert result.digest == fixed_episodes(tiny_pool, 40, 5, 1, 3, 0).digest()
    blind = evaluate_setting(method, tiny_pool, tiny_pool.with_examples(torch.zeros(len(labels), 4)), 5, 1, 3, 40, 0, 16, None)
    assert blind.accuracy == pytest.approx(3 / 15) and blind.ci95 == pytest.approx(0.0, abs=1e-7)
    assert blind.digest == result.digest
