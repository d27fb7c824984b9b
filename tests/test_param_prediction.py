"""Parameter prediction (Qiao et al.; Gidaris & Komodakis) and the supervised pre-training it starts from."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from metaflowlib.config import parse_params
from metaflowlib.config.methods import method_spec
from metaflowlib.episodes import EpisodeSampler, TaskPool
from metaflowlib.errors import ConfigError, DivergenceError
from metaflowlib.evaluate import embed_pool, evaluate_setting
from metaflowlib.methods import ParameterPredictor, ProtoNet
from metaflowlib.models import conv4_output_dim
from metaflowlib.pretrain import pretrain_feature_map
from metaflowlib.train import MetaTrainer, build_meta_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def episode_of(pool: TaskPool, ways: int = 5, shots: int = 2, queries: int = 3, tasks: int = 2, seed: int = 0):
    return next(EpisodeSampler(pool, ways, shots, queries, tasks, seed=seed))


def test_the_predictor_is_reached_only_through_the_support_derived_weights(tiny_pool):
    torch.manual_seed(0)
    method = ParameterPredictor(hidden=8).train()
    torch.nn.init.normal_(method.phi[-1].weight, std=0.1)  # away from the zero start, where phi's first layer has no gradient yet
    episode = episode_of(tiny_pool)
    support = method.features(episode.support_x.flatten(0, 1)).unflatten(0, episode.support_x.shape[:2])
    query = method.features(episode.query_x.flatten(0, 1)).unflatten(0, episode.query_x.shape[:2])
    assert not support.requires_grad and not query.requires_grad  # the frozen map passes no gradient

    theta = method.adapt(support, episode.support_y, episode.ways)
    detached = tuple(t.detach() for t in theta)
    F.cross_entropy(method.predict(detached, query).flatten(0, 1), episode.query_y.flatten()).backward()
    predictor = [p for name, p in method.named_parameters() if name.startswith(("phi.", "phi_avg"))]
    assert all(p.grad is None for p in predictor)  # the query path alone reaches only the scale
    assert method.log_scale.grad is not None

    method.zero_grad(set_to_none=True)
    method.meta_gradient(episode)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor)
    assert all(p.grad is None for p in method.embedding.parameters())


def test_meta_training_leaves_the_frozen_feature_map_untouched(tiny_pool):
    torch.manual_seed(0)
    method = ParameterPredictor(hidden=8)
    before = copy.deepcopy(method.embedding.state_dict())  # BatchNorm running statistics included
    optimizer, scheduler = build_meta_optimizer(method, "adam", 1e-2, 100, 1.0)
    assert all(not p.requires_grad for p in method.embedding.parameters())
    assert {id(p) for group in optimizer.param_groups for p in group["params"]}.isdisjoint(id(p) for p in method.embedding.parameters())
    sampler = EpisodeSampler(tiny_pool, 5, 2, 3, 2, seed=0)  # images: features computed inside each step, in train mode
    MetaTrainer(method, sampler, optimizer, scheduler, validate=lambda m: 0.0, val_every=10, max_episodes=10,
                max_seconds=None, progress="off").run()
    method.train()
    assert method.training and not method.embedding.training  # BatchNorm of the frozen map stays in eval mode
    for name, tensor in method.embedding.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_an_embedded_pool_gives_the_same_meta_loss_as_its_images(tiny_pool):
    torch.manual_seed(0)
    method = ParameterPredictor(hidden=8).eval()
    features = embed_pool(method, tiny_pool, None)
    from_images = method.meta_loss(episode_of(tiny_pool, seed=3))[0]
    from_features = method.meta_loss(episode_of(features, seed=3))[0]
    assert episode_of(features).embedded and not episode_of(tiny_pool).embedded
    assert torch.allclose(from_images, from_features, atol=1e-5)


@pytest.mark.parametrize("combine", [True, False])
def test_meta_training_starts_from_the_cosine_prototype_classifier(tiny_pool, combine):
    torch.manual_seed(0)
    method = ParameterPredictor(hidden=8, predictor_hidden=0 if not combine else 16, combine_prototypes=combine).eval()
    episode = episode_of(embed_pool(method, tiny_pool, None))
    logits = method.predict(method.adapt(episode.support_x, episode.support_y, episode.ways), episode.query_x)
    prototypes = ProtoNet(distance="cosine", temperature=10.0).adapt(episode.support_x, episode.support_y, episode.ways)
    cosine = F.normalize(episode.query_x, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
    assert torch.allclose(logits, 10.0 * cosine, atol=1e-5)


def test_pretraining_then_prediction_beats_chance_and_keeps_the_best_map(tiny_pool):
    torch.manual_seed(0)
    hidden = 16
    proto = ProtoNet(hidden=hidden, distance="cosine")
    scores = []

    def validate() -> float:
        features = embed_pool(proto, tiny_pool, None)
        scores.append(evaluate_setting(proto, tiny_pool, features, 5, 1, 3, 40, 1, 20, None).accuracy)
        return scores[-1]

    result = pretrain_feature_map(proto.embedding, tiny_pool, dim=conv4_output_dim(28, hidden), batch_size=32, lr=3e-3,
                                  scale=10.0, max_epochs=3, max_seconds=None, validate=validate, progress=False)
    assert result.epochs == pytest.approx(3.0) and result.steps == 12 and len(result.history) == 3
    assert result.best_val_accuracy == max(scores) and result.best_epoch == scores.index(max(scores)) + 1
    assert not proto.embedding.training
    assert validate() == pytest.approx(result.best_val_accuracy)  # the best map is the one returned

    method = ParameterPredictor(hidden=hidden)
    method.embedding.load_state_dict(proto.embedding.state_dict())
    features = embed_pool(method.eval(), tiny_pool, None)
    optimizer, scheduler = build_meta_optimizer(method, "adam", 1e-3, 100, 1.0)
    MetaTrainer(method, EpisodeSampler(features, 5, 2, 3, 4, seed=0), optimizer, scheduler, validate=lambda m: 0.0,
                val_every=20, max_episodes=20, max_seconds=None, progress="off").run()
    accuracy = evaluate_setting(method.eval(), tiny_pool, embed_pool(method, tiny_pool, None), 5, 1, 3, 40, 2, 20, None).accuracy
    assert accuracy > 0.5  # chance is 0.2


def test_pretraining_stops_on_a_non_finite_loss(tiny_pool):
    poisoned = tiny_pool.with_examples(tiny_pool.examples.clone())
    poisoned.examples[0] = float("nan")
    proto = ProtoNet(hidden=8)
    with pytest.raises(DivergenceError, match="non-finite pre-training loss"):
        pretrain_feature_map(proto.embedding, poisoned, dim=conv4_output_dim(28, 8), batch_size=200, lr=1e-3, scale=10.0,
                             max_epochs=1, max_seconds=None, validate=lambda: 0.0, progress=False)


def test_params_block_and_its_pretraining_budget():
    params = parse_params({"methods": {"pp": {"kind": "param_prediction",
                                              "pretrain": {"budget": {"default": {"epochs": 3, "seconds": 5}}}},
                                       "proto": {"kind": "protonet"}}})
    pretrain, budget = method_spec(params, "pp").pretrain_in(params.profile)
    assert budget.count == budget.epochs == 3 and budget.seconds == 5 and pretrain.batch_size == 256
    assert method_spec(params, "proto").pretrain_in(params.profile) is None
    assert method_spec(params, "pp").model_config_dict(28)["combine_prototypes"] is True
    with pytest.raises(ConfigError, match="methods.pp.pretrain.budget.default.epochs: Field required"):
        parse_params({"methods": {"pp": {"kind": "param_prediction", "pretrain": {"budget": {"default": {"seconds": 5}}}}}})
    with pytest.raises(ConfigError, match="methods.proto.pretrain: protonet starts from no pre-trained module"):
        method_spec(parse_params({"methods": {"proto": {"kind": "protonet", "pretrain": {}}}}), "proto")
