"""Do the MAML family's assumptions hold at the defaults? Tests that would have caught issue 15.

The float64 reference tests (test_maml_family.py) check arithmetic; these check that each method's
approximation holds where it is used: first-order MAML's d theta_i / d theta ~ I on real Omniglot
tasks, iMAML's conjugate gradient on an indefinite system, and the damped implicit gradient against
backpropagation through a solved inner problem.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaflowlib.config import parse_params
from metaflowlib.config.methods import method_spec
from metaflowlib.data.omniglot import load_npz_mirror
from metaflowlib.data.preprocess import to_model_input
from metaflowlib.episodes import EpisodeSampler, TaskPool
from metaflowlib.methods import IMAML, Reptile, build_method
from metaflowlib.methods.imaml import conjugate_gradient, implicit_gradient
from metaflowlib.train import build_meta_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def omniglot_tasks(shared_data):
    """8 real 5-way 1-shot 15-query tasks at 28x28 (the first 40 background characters)."""
    images = load_npz_mirror(shared_data, verify=False)[0].images[:40]
    pixels = np.where(images, 255, 0).astype(np.uint8).reshape(-1, 105, 105)
    pool = TaskPool(to_model_input(pixels, 28), torch.arange(40).repeat_interleave(20))
    return next(EpisodeSampler(pool, 5, 1, 15, tasks=8, seed=0))


def group_cosines(method, episode) -> dict[str, float]:
    """Cosine between the first- and second-order meta-gradients of the 8-task batch, per parameter group."""
    grads = {}
    for first_order in (True, False):
        method.first_order = first_order
        loss, _ = method.meta_loss(episode)
        grads[first_order] = dict(zip(method.omega(), torch.autograd.grad(loss, list(method.omega().values()))))
    kinds = {name: ("head" if name.startswith("1.") else type(method.net.get_submodule(name.rsplit(".", 1)[0])).__name__)
             for name in grads[True]}
    out = {}
    for group in set(kinds.values()):
        names = [n for n, k in kinds.items() if k == group]
        a, b = (torch.cat([grads[o][n].flatten() for n in names]) for o in (True, False))
        out[group] = float(F.cosine_similarity(a, b, dim=0))
    return out


def params_block(kind: str) -> dict:
    """The method exactly as the shipped params.yaml builds it."""
    import yaml

    from conftest import ROOT

    p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    key = next(k for k, m in p.methods.items() if m.kind == kind)
    return method_spec(p, key).model_config_dict(p.data.image_size)


def test_first_order_meta_gradient_agrees_with_second_order_at_the_default_init(omniglot_tasks) -> None:
    """Finn et al.'s first-order approximation needs alpha * H small; at the shipped settings every parameter
    group's first-order meta-gradient points the way the second-order one does."""
    torch.manual_seed(0)
    method = build_method("fomaml", **{**params_block("fomaml"), "vectorize": "loop"})
    cosines = group_cosines(method, omniglot_tasks)
    assert set(cosines) == {"Conv2d", "BatchNorm2d", "head"}
    assert all(c > 0.2 for c in cosines.values()), cosines
    assert min(cosines["Conv2d"], cosines["BatchNorm2d"]) > 0.5, cosines


def test_the_cosine_test_catches_the_setting_that_broke_first_order_maml(omniglot_tasks) -> None:
    """The settings before issue 15 (max-pooled Conv-4, alpha 0.4): the head's meta-gradients point apart."""
    torch.manual_seed(0)
    method = build_method("fomaml", layout="maxpool", head_init="zeros", vectorize="loop")
    assert group_cosines(method, omniglot_tasks)["head"] < 0


def test_conjugate_gradient_stops_on_negative_curvature_and_says_so() -> None:
    """A = diag(2, 1, -3) is indefinite: CG takes its positive-curvature step, then meets p'Ap <= 0, stops
    with the iterate it has (not a division by a negative curvature), and reports it."""
    a = torch.tensor([2.0, 1.0, -3.0], dtype=torch.float64)
    b = {"v": torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)}
    result = conjugate_gradient(lambda v: {"v": a * v["v"]}, b, steps=3)
    first_step = (b["v"] @ b["v"]) / (b["v"] @ (a * b["v"])) * b["v"]  # one CG step from 0 along p = b
    assert bool(result.stopped)
    assert torch.allclose(result.x["v"], first_step)
    residual = torch.linalg.norm(b["v"] - a * first_step) / torch.linalg.norm(b["v"])
    assert float(result.residual) == pytest.approx(float(residual))
    positive = conjugate_gradient(lambda v: {"v": a.abs() * v["v"]}, b, steps=3)
    assert not bool(positive.stopped) and float(positive.residual) < 1e-12


def test_damped_implicit_gradient_is_the_exact_one_of_a_stiffer_proximal_problem() -> None:
    """What imaml_dev's damping computes: A_d = (1 + c) I + H / (lam + lam_d) gives
    A_d^{-1} g = 1/(1 + c) (I + H / lam')^{-1} g with lam' = (1 + c)(lam + lam_d), the exact implicit
    meta-gradient of the inner problem regularized with lam' (checked against its closed form on a
    quadratic, where the inner problem is solved exactly). Damping buys a positive definite system,
    not the gradient of the inner problem at lam: it is the meta-gradient of a stiffer one."""
    g = torch.Generator().manual_seed(0)
    d, lam, c, lam_d = 5, 2.0, 1.0, 10.0
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    # H so indefinite that I + H/lam is too (1 - 3/2 < 0), while A_d stays positive definite (2 - 3/12 > 0)
    a = q @ torch.diag(torch.tensor([-3.0, -0.5, 0.5, 3.0, 30.0], dtype=torch.float64)) @ q.T
    query_grad = {"w": torch.randn(d, generator=g, dtype=torch.float64)}
    phi = {"w": torch.randn(d, generator=g, dtype=torch.float64)}
    damped = implicit_gradient(lambda p: 0.5 * p["w"] @ a @ p["w"], phi, query_grad, lam, d, c, lam_d)
    stiff = (1 + c) * (lam + lam_d)
    exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) + a / stiff, query_grad["w"]) / (1 + c)
    assert torch.allclose(damped.x["w"], exact, atol=1e-10) and not bool(damped.stopped)


def test_imaml_diagnostics_report_the_inner_solve_and_cg() -> None:
    episode = _episode(tasks=2)
    imaml = IMAML(ways=3, hidden=4, image_size=12, vectorize="loop").train()
    report = imaml.diagnostics(episode)
    assert set(report) == {"inner_grad_norm", "cg_residual", "cg_stopped_early"}
    assert report["inner_grad_norm"] > 0 and 0 <= report["cg_stopped_early"] <= 1 and report["cg_residual"] < 1
    assert imaml.omega()["1.weight"].grad is None  # diagnostics leave the meta-gradient alone


def test_reptile_inner_loop_is_nichol_et_al_adam_on_class_balanced_mini_batches() -> None:
    """W_i equals torch.optim.Adam(betas=(0, 0.999)) run by hand on mini-batches of `inner_batch` examples that
    each hold every class (support and query interleaved class by class)."""
    episode = _episode(tasks=1, shots=2, queries=2, dtype=torch.float64)
    torch.manual_seed(0)
    reptile = Reptile(ways=3, hidden=4, image_size=12, inner_steps=4, inner_lr=0.01, inner_batch=3, vectorize="loop").double()
    names = list(reptile.omega())
    x = torch.cat([episode.support_x[0].unflatten(0, (3, 2)), episode.query_x[0].unflatten(0, (3, 2))], 1).transpose(0, 1).flatten(0, 1)
    y = torch.cat([episode.support_y[0].unflatten(0, (3, 2)), episode.query_y[0].unflatten(0, (3, 2))], 1).transpose(0, 1).flatten(0, 1)
    weights = [p.detach().clone().requires_grad_() for p in reptile.omega().values()]
    adam = torch.optim.Adam(weights, lr=0.01, betas=(0.0, 0.999))
    for step in range(4):
        batch = slice(3 * step % 12, 3 * step % 12 + 3)
        assert sorted(y[batch].tolist()) == [0, 1, 2]
        adam.zero_grad()
        reptile.task_loss(dict(zip(names, weights)), x[batch], y[batch]).backward()
        adam.step()
    theta = {k: v.detach().clone() for k, v in reptile.omega().items()}
    reptile.meta_gradient(episode)
    for (name, p), w in zip(reptile.omega().items(), weights):
        assert torch.allclose(theta[name] - p.grad, w.detach(), atol=1e-10), name  # .grad = -(W_i - theta)


def test_reptile_diagnostics_show_the_inner_loop_making_progress() -> None:
    episode = _episode(tasks=2, shots=2, queries=2)
    reptile = Reptile(ways=3, hidden=4, image_size=12, inner_steps=10, inner_lr=0.01, vectorize="loop")
    report = reptile.diagnostics(episode)
    assert report["inner_loss_after"] < report["inner_loss_before"] and report["inner_grad_norm"] > 0


def test_linear_meta_step_anneals_to_zero_over_the_budget() -> None:
    method = build_method("reptile", ways=3, hidden=4, image_size=12)
    optimizer, scheduler = build_meta_optimizer(method, "sgd", 1.0, 1, 1.0, schedule="linear", total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25]) and scheduler.get_last_lr()[0] == 0.0
    with pytest.raises(ValueError, match="total_steps"):
        build_meta_optimizer(method, "sgd", 1.0, 1, 1.0, schedule="linear")


def test_params_refuse_a_budget_in_seconds_alone() -> None:
    """Every budget is in episodes (a linear schedule anneals to 0 at the last one; a result must not depend on the
    machine's speed); seconds are only a cap."""
    from metaflowlib.config import ConfigError

    block = {"kind": "reptile", "meta_optimizer": {"name": "sgd", "lr": 1.0, "schedule": "linear"},
             "budget": {"default": {"seconds": 60}, "full": {"episodes": 10}}}
    with pytest.raises(ConfigError, match=r"methods\.reptile\.budget\.default\.episodes"):
        method_spec(parse_params({"methods": {"reptile": block}}), "reptile")


def _episode(tasks: int, shots: int = 1, queries: int = 2, dtype: torch.dtype = torch.float32):
    from metaflowlib.episodes import Episode

    g = torch.Generator().manual_seed(0)
    labels = lambda k: torch.arange(3).repeat_interleave(k).expand(tasks, -1)  # noqa: E731
    return Episode(torch.randn(tasks, 3 * shots, 1, 12, 12, generator=g, dtype=dtype), labels(shots),
                   torch.randn(tasks, 3 * queries, 1, 12, 12, generator=g, dtype=dtype), labels(queries), 3)
