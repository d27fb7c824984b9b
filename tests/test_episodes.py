import pytest
import torch

from metaflowlib.episodes import EpisodeSampler, TaskPool, fixed_episodes
from metaflowlib.errors import DataError


def pool(classes=10, per_class=8):
    examples = torch.arange(classes * per_class).float()
    return TaskPool(examples, examples.long() // per_class, "toy")


@pytest.mark.parametrize("on_device", [False, True])  # True: the CUDA stream's code, here on the CPU
def test_episode_shapes_labels_and_disjointness(on_device):
    p = pool()
    episode = next(EpisodeSampler(p, ways=5, shots=2, queries=3, tasks=4, seed=1, on_device=on_device))
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


@pytest.mark.parametrize("on_device", [False, True])
def test_sampler_state_round_trip(on_device):
    s = EpisodeSampler(pool(), 5, 1, 1, seed=0, on_device=on_device)
    state = s.state()
    first = next(s)
    s.load_state(state)
    assert torch.equal(next(s).support_x, first.support_x)


@pytest.mark.parametrize("on_device", [False, True])
def test_uneven_classes_only_use_eligible_ones(on_device):
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3 + [3] * 12)  # class 2 is too small; 3 is the widest
    p = TaskPool(torch.arange(35).float(), labels)
    episode = next(EpisodeSampler(p, 2, 2, 2, tasks=30, seed=0, on_device=on_device))
    classes = labels[torch.cat([episode.support_x.view(30, 2, 2), episode.query_x.view(30, 2, 2)], dim=2).long()]
    assert (classes != 2).all() and (classes == classes[..., :1]).all()  # padding positions never picked
    both = torch.cat([episode.support_x, episode.query_x], dim=1)
    assert all(both[t].unique().numel() == 8 for t in range(30))


def test_on_a_uniform_pool_the_device_code_draws_what_the_host_code_draws():
    """So on the CPU the two differ only where classes differ in size; on CUDA the generator is another one."""
    host, device = EpisodeSampler(pool(), 5, 1, 1, tasks=8, seed=0), EpisodeSampler(pool(), 5, 1, 1, tasks=8, seed=0, on_device=True)
    assert torch.equal(next(host).support_x, next(device).support_x)
    with pytest.raises(DataError, match="resume on the device it was written on"):  # a CUDA generator's 16 bytes
        host.load_state(torch.zeros(16, dtype=torch.uint8))
    if torch.cuda.is_available():
        on_gpu = EpisodeSampler(TaskPool(pool().examples.cuda(), pool().examples.long() // 8), 5, 1, 1, seed=0)
        assert on_gpu.on_device and on_gpu.generator.device.type == "cuda"
        with pytest.raises(DataError, match="resume on the device it was written on"):
            on_gpu.load_state(host.state())


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
