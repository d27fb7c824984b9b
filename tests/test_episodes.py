import pytest
import torch

from metaflowlib.episodes import EpisodeSampler, TaskPool, fixed_episodes
from metaflowlib.errors import DataError


def pool(classes=10, per_class=8):
    examples = torch.arange(classes * per_class).float()
    return TaskPool(examples, examples.long() // per_class, "toy")


def test_episode_shapes_labels_and_disjointness():
    p = pool()
    episode = next(EpisodeSampler(p, ways=5, shots=2, queries=3, tasks=4, seed=1))
    assert episode.support_x.shape == (4, 10) and episode.query_x.shape == (4, 15)
    assert episode.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for t in range(4):
        support_classes = (episode.support_x[t] // 8).long().view(5, 2)
        query_classes = (episode.query_x[t] // 8).long().view(5, 3)
        # each label is one class, the same in support and query; the N classes are distinct
        assert (support_classes == support_classes[:, :1]).all() and (query_classes == support_classes[:, :1]).all()
        assert support_classes[:, 0].unique().numel() == 5
        # no example is used twice in a task
        both = torch.cat([episode.support_x[t], episode.query_x[t]])
        assert both.unique().numel() == both.numel()


def test_label_to_class_mapping_is_random():
    episode = next(EpisodeSampler(pool(), 5, 1, 1, tasks=50, seed=0))
    classes = (episode.support_x // 8).long()
    assert not all(torch.equal(classes[t], classes[t].sort().values) for t in range(50))


def test_seed_fixes_tasks_and_digest():
    p = pool()
    a, b = fixed_episodes(p, 20, 5, 1, 2, seed=3), fixed_episodes(p, 20, 5, 1, 2, seed=3)
    c = fixed_episodes(p, 20, 5, 1, 2, seed=4)
    assert torch.equal(a.support, b.support) and a.digest() == b.digest()
    assert a.digest() != c.digest()


def test_sampler_state_round_trip():
    s = EpisodeSampler(pool(), 5, 1, 1, seed=0)
    state = s.state()
    first = next(s)
    s.load_state(state)
    assert torch.equal(next(s).support_x, first.support_x)


def test_uneven_classes_only_use_eligible_ones():
    examples = torch.arange(23).float()
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    p = TaskPool(examples, labels)
    episode = next(EpisodeSampler(p, 2, 2, 2, tasks=30, seed=0))
    assert (episode.support_x < 20).all() and (episode.query_x < 20).all()


@pytest.mark.parametrize("ways,shots,queries,match", [
    (11, 1, 1, "only 10 of 10 classes"),
    (5, 5, 4, "have >= 9 examples"),
    (1, 1, 1, "ways must be >= 2"),
])
def test_impossible_tasks_are_refused(ways, shots, queries, match):
    with pytest.raises(DataError, match=match):
        EpisodeSampler(pool(), ways, shots, queries)


def test_empty_or_mismatched_pool_is_refused():
    with pytest.raises(DataError, match="empty"):
        TaskPool(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="3 examples but 2 labels"):
        TaskPool(torch.zeros(3), torch.zeros(2, dtype=torch.long))
