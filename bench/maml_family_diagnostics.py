"""Do the MAML family's assumptions hold at the pipeline's settings? Measured on real tasks.

    python bench/maml_family_diagnostics.py --out bench/results/maml_family_diagnostics/after.json

Each method is built from its `methods.<key>` block of params.yaml (as `train@<key>` builds it,
same seed), and probed on 8 real 5-way 1-shot 15-query tasks of the prepared Vinyals train split
(`dvc repro prepare` first). Run before and after a change to a method's settings: the two JSON
files side by side show whether the change repaired the assumption it targets.

- first-order MAML (Finn et al. 2017 sec. 5.2) assumes d theta_i / d theta ~ I. Measured: the
  cosine between its meta-gradient and second-order MAML's, per parameter group (mean over tasks
  of the per-task cosines); |E f|^2 of the features the head sees; alpha * lambda_max of the
  support-loss Hessian in the head weight (I - alpha H has an eigenvalue below -1 when that
  exceeds 2); and 30 meta-steps of MAML and first-order MAML from the same init and tasks.
- iMAML (Rajeswaran et al. 2019) assumes the proximal inner problem is solved (gradient ~ 0) and
  that the CG system matrix is positive definite. Measured: the inner gradient norm after k and
  4k steps, lambda_max / lambda_min of the support-loss Hessian at theta and phi_k (power
  iteration), CG's curvature p'Ap and residual per iteration, and the cosine between the implicit
  meta-gradient and the gradient through the same unrolled inner steps.
- Reptile (Nichol et al. 2018): the inner loss per step and the final gradient norm (does the
  inner optimizer overshoot?), and lr * lambda_max at theta for an SGD inner loop.

Writes one JSON with every number, the device and the torch version.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, jvp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaflowlib.config import Params, load_params  # noqa: E402
from metaflowlib.config.methods import method_spec  # noqa: E402
from metaflowlib.data.store import load_pool  # noqa: E402
from metaflowlib.episodes import Episode, EpisodeSampler, TaskPool  # noqa: E402
from metaflowlib.evaluate import evaluate_setting  # noqa: E402
from metaflowlib.methods.inner_loop import InitializationLearner  # noqa: E402
from metaflowlib.io import write_json  # noqa: E402
from metaflowlib.runtime import device_name  # noqa: E402

Vector = dict[str, Tensor]
TASKS, WAYS, SHOTS, QUERIES, SIDE = 8, 5, 1, 15, 28
IMAML_TASKS = 4  # Hessian eigenvalues by power iteration cost minutes per task on 2 CPU cores


def build(p: Params, key: str) -> InitializationLearner:
    """The method exactly as `train@<key>` starts it: same params block, same seed before construction."""
    mp = method_spec(p, key)
    torch.manual_seed(p.seed)
    return mp.build(p.data.image_size)


def groups(net: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> group of a Conv-4 + head network: conv, batchnorm, head_weight, head_bias."""
    out = {}
    for name, _ in net.named_parameters():
        module_name, leaf = name.rsplit(".", 1)
        if module_name == "1":
            out[name] = f"head_{leaf}"
        else:
            out[name] = "conv" if isinstance(net.get_submodule(module_name), torch.nn.Conv2d) else "batchnorm"
    return out


def cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def group_cosines(a: Vector, b: Vector, group_of: dict[str, str]) -> dict[str, float]:
    out = {}
    for g in ("head_weight", "head_bias", "conv", "batchnorm"):
        names = [k for k in a if group_of[k] == g]
        out[g] = cosine(torch.cat([a[k].flatten() for k in names]), torch.cat([b[k].flatten() for k in names]))
    out["all"] = cosine(torch.cat([v.flatten() for v in a.values()]), torch.cat([v.flatten() for v in b.values()]))
    return out


def task(episode: Episode, i: int) -> Episode:
    return Episode(episode.support_x[i : i + 1], episode.support_y[i : i + 1], episode.query_x[i : i + 1],
                   episode.query_y[i : i + 1], episode.ways)


def meta_gradient(method, episode: Episode, first_order: bool) -> Vector:
    """d(query loss after adaptation)/d theta for one episode, first- or second-order."""
    method.train()
    saved = method.first_order
    method.first_order = first_order
    try:
        loss, _ = method.meta_loss(episode)
        names, params = zip(*method.omega().items())
        grads = torch.autograd.grad(loss, params)
    finally:
        method.first_order = saved
    return dict(zip(names, grads))


def _dot(a: Vector, b: Vector) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _norm(a: Vector) -> float:
    return float(_dot(a, a).sqrt())


def _scale(a: Vector, c: float | Tensor) -> Vector:
    return {k: v * c for k, v in a.items()}


def extreme_eigenvalues(hvp: Callable[[Vector], Vector], like: Vector, iterations: int = 15, seed: int = 0) -> tuple[float, float]:
    """lambda_max and lambda_min of a symmetric operator by power iteration (the second on H - lambda_max I)."""
    g = torch.Generator().manual_seed(seed)

    def power(op: Callable[[Vector], Vector]) -> float:
        v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in like.items()}
        v = _scale(v, 1 / _norm(v))
        value = 0.0
        for _ in range(iterations):
            w = op(v)
            value = float(_dot(v, w))
            v = _scale(w, 1 / max(_norm(w), 1e-30))
        return value

    top = power(hvp)
    shifted = power(lambda v: {k: hv - top * v[k] for k, hv in hvp(v).items()})
    return top, shifted + top


def head_weight_curvature(method, episode: Episode) -> float:
    """lambda_max of the support-loss Hessian in the head weight alone, at theta (mean over tasks)."""
    theta = {k: v.detach() for k, v in method.omega().items()}
    values = []
    for i in range(episode.tasks):
        x, y = episode.support_x[i], episode.support_y[i]

        def loss_w(w: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(method.net, {**theta, "1.weight": w}, (x,)), y)

        gw = grad(loss_w)
        top, _ = extreme_eigenvalues(lambda v: {"w": jvp(gw, (theta["1.weight"],), (v["w"],))[1]},
                                     {"w": theta["1.weight"]}, iterations=30, seed=i)
        values.append(top)
    return sum(values) / len(values)


def fomaml_probe(p: Params, key: str, episode: Episode, train_pool: TaskPool, val_pool: TaskPool, steps: int) -> dict:
    method = build(p, key)
    method._mode(episode.support_x)  # select the loop's batch-norm kernel, as meta-training does
    group_of = groups(method.net)
    per_task = [group_cosines(meta_gradient(method, task(episode, i), True), meta_gradient(method, task(episode, i), False),
                              group_of) for i in range(episode.tasks)]
    mean_cos = {g: sum(c[g] for c in per_task) / len(per_task) for g in per_task[0]}
    with torch.no_grad():
        method.train()
        f = method.net[0](torch.cat([episode.support_x, episode.query_x], 1).flatten(0, 1))
    curvature = head_weight_curvature(method, episode)
    return {
        "inner_lr": method.inner_lr,
        "head_init": getattr(method, "head_init", "zeros"),
        "layout": getattr(method.net[0], "layout", "maxpool"),
        "cosine_first_vs_second_order_mean_over_tasks": mean_cos,
        "mean_feature_sq_norm": float(f.mean(0).pow(2).sum()),
        "feature_sq_norm": float(f.pow(2).sum(1).mean()),
        "alpha_lambda_max_head_weight": method.inner_lr * curvature,
        "short_training": short_training(p, key, train_pool, val_pool, steps),
    }


def short_training(p: Params, key: str, train_pool: TaskPool, val_pool: TaskPool, steps: int) -> dict:
    """`steps` meta-steps x 8 tasks of MAML and first-order MAML from the same init and task stream."""
    out = {}
    for name, first_order in (("maml", False), ("fomaml", True)):
        method = build(p, key)
        method.first_order = first_order
        w0 = method.net[1].weight.detach().clone()
        optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
        sampler = EpisodeSampler(train_pool, WAYS, SHOTS, QUERIES, TASKS, seed=p.seed)
        start = time.perf_counter()
        for _ in range(steps):
            method.train()
            optimizer.zero_grad()
            method.meta_gradient(next(sampler))
            head_grad = method.net[1].weight.grad.detach().clone()
            optimizer.step()
        seconds = time.perf_counter() - start
        method.eval()
        w = method.net[1].weight.detach()
        with torch.no_grad():
            f = method.net[0](next(sampler).support_x.flatten(0, 1)).mean(0)
        along_mean_feature = float((w @ f).pow(2).sum() / f.pow(2).sum() / w.pow(2).sum()) if w.abs().sum() else 0.0
        accuracy = evaluate_setting(method, val_pool, None, WAYS, SHOTS, QUERIES, 200, p.seed + 1, 50, None).accuracy
        out[name] = {"val_accuracy_5w1s_200_tasks": accuracy,
                     "last_head_meta_gradient_cosine_with_head": cosine(head_grad, w) if w.abs().sum() else None,
                     "head_sq_norm_fraction_on_mean_feature": along_mean_feature,
                     "head_norm_change": float((w - w0).norm()), "seconds": seconds}
    return out


def cg_trace(matvec: Callable[[Vector], Vector], b: Vector, steps: int) -> dict:
    """Conjugate gradient from 0, recording the curvature p'Ap and the true residual ||b - Ax|| per iteration."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p_ = dict(b), dict(b)
    rs = _dot(r, r)
    curvature, residual = [], [math.sqrt(float(rs))]
    for _ in range(steps):
        ap = matvec(p_)
        pap = _dot(p_, ap)
        curvature.append(float(pap))
        alpha = rs / pap
        x = {k: x[k] + alpha * p_[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        p_ = {k: r[k] + (rs_new / rs) * p_[k] for k in p_}
        rs = rs_new
        residual.append(_norm({k: b[k] - v for k, v in matvec(x).items()}))
    return {"x": x, "curvature": curvature, "residual": residual}


def imaml_probe(p: Params, key: str, episode: Episode) -> dict:
    method = build(p, key)
    method._mode(episode.support_x)
    method.train()
    lam = method.lam
    cg_damping, lam_damping = getattr(method, "cg_damping", 0.0), getattr(method, "lam_damping", 0.0)
    theta = {k: v.detach() for k, v in method.omega().items()}
    rows = []
    for i in range(IMAML_TASKS):
        sx, sy, qx, qy = episode.support_x[i], episode.support_y[i], episode.query_x[i], episode.query_y[i]

        def support_loss(phi: Vector) -> Tensor:
            return method.task_loss(phi, sx, sy)

        def query_loss(phi: Vector) -> Tensor:
            return method.task_loss(phi, qx, qy)

        def proximal_grad_norm(phi: Vector) -> float:
            g = grad(support_loss)(phi)
            return _norm({k: g[k] + lam * (phi[k] - theta[k]) for k in g})

        def solve(steps: int) -> Vector:
            with torch.no_grad():
                phi = method.fine_tune(theta, sx[None], sy[None], steps, first_order=True, proximal=lam)
            return {k: v[0] for k, v in phi.items()}

        k = method.inner_steps
        phi_k, phi_4k = solve(k), solve(4 * k)
        support_grad = grad(support_loss)

        def hvp_at(phi: Vector) -> Callable[[Vector], Vector]:
            return lambda v: jvp(support_grad, (phi,), (v,))[1]

        eig_theta, eig_phi = extreme_eigenvalues(hvp_at(theta), theta, seed=i), extreme_eigenvalues(hvp_at(phi_k), theta, seed=i)
        hv = hvp_at(phi_k)

        def matvec(v: Vector) -> Vector:
            h = hv(v)
            return {n: (1 + cg_damping) * v[n] + h[n] / (lam + lam_damping) for n in v}

        query_grad = grad(query_loss)(phi_k)
        trace = cg_trace(matvec, query_grad, method.cg_steps)
        trace10 = cg_trace(matvec, query_grad, 10)

        # the gradient through the same k unrolled proximal steps (second order through every step)
        live = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
        unrolled_phi = method.fine_tune(live, sx[None], sy[None], k, first_order=False, proximal=lam)
        unrolled = torch.autograd.grad(query_loss({n: v[0] for n, v in unrolled_phi.items()}), list(live.values()))
        unrolled = dict(zip(live, unrolled))
        rows.append({
            "proximal_grad_norm_k": proximal_grad_norm(phi_k), "proximal_grad_norm_4k": proximal_grad_norm(phi_4k),
            "lambda_max_theta": eig_theta[0], "lambda_min_theta": eig_theta[1],
            "lambda_max_phi_k": eig_phi[0], "lambda_min_phi_k": eig_phi[1],
            "cg_curvature": trace["curvature"], "cg_residual": trace["residual"],
            "cg_first_negative_curvature": next((j + 1 for j, c in enumerate(trace10["curvature"]) if c <= 0), None),
            "cg10_residual": trace10["residual"],
            "cosine_implicit_vs_unrolled": cosine(torch.cat([v.flatten() for v in trace["x"].values()]),
                                                  torch.cat([unrolled[n].flatten() for n in trace["x"]])),
        })
    return {
        "lam": lam, "inner_lr": method.inner_lr, "inner_steps": method.inner_steps, "cg_steps": method.cg_steps,
        "cg_damping": cg_damping, "lam_damping": lam_damping,
        "inner_lr_times_lambda_max_plus_lam": method.inner_lr * (sum(r["lambda_max_theta"] for r in rows) / len(rows) + lam),
        "mean": {name: sum(r[name] for r in rows) / len(rows) for name in
                 ("proximal_grad_norm_k", "proximal_grad_norm_4k", "lambda_max_theta", "lambda_min_theta",
                  "lambda_max_phi_k", "lambda_min_phi_k", "cosine_implicit_vs_unrolled")},
        "tasks": rows,
    }


def reptile_probe(p: Params, key: str, episode: Episode) -> dict:
    method = build(p, key)
    method._mode(episode.support_x)
    method.train()
    theta = {k: v.detach() for k, v in method.omega().items()}
    rows = []
    for i in range(episode.tasks):
        x, y = episode.support_x[i], episode.support_y[i]
        if getattr(method, "use_query", False):
            x, y = torch.cat([x, episode.query_x[i]]), torch.cat([y, episode.query_y[i]])
        losses = []
        for steps in range(method.inner_steps + 1):
            with torch.no_grad():
                phi = method.fine_tune(theta, x[None], y[None], steps, first_order=True) if steps else {k: v[None] for k, v in theta.items()}
            phi = {k: v[0] for k, v in phi.items()}
            losses.append(float(method.task_loss(phi, x, y)))
        final_grad = grad(lambda q: method.task_loss(q, x, y))(phi)
        support_grad = grad(lambda q: method.task_loss(q, x, y))
        top, _ = extreme_eigenvalues(lambda v: jvp(support_grad, (theta,), (v,))[1], theta, seed=i)
        rows.append({"inner_losses": losses, "final_grad_norm": _norm(final_grad), "lambda_max_theta": top})
    return {
        "inner_optimizer": type(method.inner_optimizer).__name__, "inner_lr": method.inner_lr,
        "inner_steps": method.inner_steps,
        "lr_times_lambda_max": method.inner_lr * sum(r["lambda_max_theta"] for r in rows) / len(rows),
        "mean_final_grad_norm": sum(r["final_grad_norm"] for r in rows) / len(rows),
        "tasks_whose_inner_loss_rose": sum(any(b > a for a, b in zip(r["inner_losses"], r["inner_losses"][1:])) for r in rows),
        "tasks": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--training-steps", type=int, default=30, help="meta-steps of the MAML/first-order MAML probe")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    device = torch.device("cpu")
    train_pool = load_pool(args.prepared, "train", device)
    val_pool = load_pool(args.prepared, "val", device)
    episode = next(EpisodeSampler(train_pool, WAYS, SHOTS, QUERIES, TASKS, seed=p.seed + 7))
    kinds = {p.methods[k].kind: k for k in p.methods}
    start = time.perf_counter()
    result = {
        "device": device_name(device), "torch": torch.__version__, "threads": args.threads,
        "tasks": f"{TASKS} x {WAYS}-way {SHOTS}-shot {QUERIES}-query, Vinyals train split",
        "fomaml": fomaml_probe(p, kinds["fomaml"], episode, train_pool, val_pool, args.training_steps),
        "imaml": imaml_probe(p, kinds["imaml"], episode),
        "reptile": reptile_probe(p, kinds["reptile"], episode),
    }
    result["seconds"] = time.perf_counter() - start
    write_json(args.out, result)
    f, i, r = result["fomaml"], result["imaml"], result["reptile"]
    print(f"first-order MAML: cos(FO, SO) {json.dumps({k: round(v, 2) for k, v in f['cosine_first_vs_second_order_mean_over_tasks'].items()})}; "
          f"alpha*lambda_max(H_WW) {f['alpha_lambda_max_head_weight']:.2f}; "
          f"30 steps: MAML {f['short_training']['maml']['val_accuracy_5w1s_200_tasks']:.3f}, "
          f"FO {f['short_training']['fomaml']['val_accuracy_5w1s_200_tasks']:.3f}")
    print(f"iMAML: {json.dumps({k: round(v, 2) for k, v in i['mean'].items()})}; "
          f"first negative curvature at CG step {[t['cg_first_negative_curvature'] for t in i['tasks']]}")
    print(f"Reptile: lr*lambda_max {r['lr_times_lambda_max']:.2f}, final grad norm {r['mean_final_grad_norm']:.3f}, "
          f"tasks whose inner loss rose {r['tasks_whose_inner_loss_rose']}/{TASKS}")
    print(f"wrote {args.out} in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
