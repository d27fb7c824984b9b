"""The learned-optimizer stages end to end on tiny synthetic pools, against a throwaway MLflow store."""

from __future__ import annotations

import json
import math
import os
import signal
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, class_images, load_stage as stage

from metaflowlib import registry
from metaflowlib.config import parse_params
from metaflowlib.config.learned_optimizer import LearnedOptimizerParams
from metaflowlib.errors import ConfigError, DataError, DivergenceError, Interrupted, PayloadError, RegistryError
from metaflowlib.learned_optimizer.learned import LSTMOptimizerNet, save_optimizer
from metaflowlib.learned_optimizer.suites import build_pools

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "omniglot-vinyals-learned-optimizer"
OPTIMIZERS = {"learned", "adam_default", "adam_tuned", "sgd_momentum"}
TINY = {
    "image_size": 8, "hidden": 4, "batch_size": 8,
    "omniglot": {"ways": 3, "train_per_class": 3, "test_per_class": 2},
    "fashion": {"ways": 2, "train_classes": [0, 1, 2], "eval_classes": [5, 6], "train_per_class": 4, "test_per_class": 3},
    "net": {"hidden_size": 4},
    "meta_train": {"unroll": 2, "horizon": 4, "budget": {"default": {"steps": 4}}, "validation_tasks": 1},
    "evaluate": {"tasks": 2, "horizons": [1, 2], "record_every": 2, "tuning_tasks": 1, "adam_lrs": [0.001, 0.01],
                 "sgd_lrs": [0.01, 0.1]},
}


def tiny_params(promote_first: bool = True, **changes):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["registry"]["promote_first"] = promote_first
    section = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section[key] = {**section.get(key, {}), **value}
    raw["optimizer"] = section
    return parse_params(raw, optimizer=LearnedOptimizerParams)


@pytest.fixture(scope="module")
def pools():
    """Omniglot-like splits (255 = paper, 5 drawings per class) and a Fashion-MNIST-like train/test."""
    omniglot = {split: class_images(6, 5, seed=i) for i, split in enumerate(("train", "val", "test"))}
    fashion = {"train": class_images(10, 6, seed=3), "test": class_images(10, 4, seed=4)}
    return build_pools(tiny_params().optimizer, omniglot, fashion)


def test_train_registers_and_promotes_then_eval_reports_every_optimizer_and_horizon(tmp_path, mlflow_store, pools):
    train, evaluate = stage("optimizer_train"), stage("optimizer_eval")
    p = tiny_params()
    out = train.train_and_register(p, tmp_path, pools)
    assert out["meta_train_steps"] == 4 and out["version"] == "1" and out["promoted"]
    assert sorted(f.name for f in (tmp_path / "models" / "learned_optimizer").iterdir()) == ["config.json", "model.safetensors"]
    production = registry.get_alias(NAME)
    assert production.version == "1" and production.tags[registry.GATE_TAG] == "val_loss_drop"
    assert math.isfinite(float(production.tags["val_loss_drop"]))
    curve = (tmp_path / "metrics" / "learned_optimizer" / "meta_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,meta_loss") and len(curve) == 5

    recorded = stage("production").resolve(p, tmp_path, "optimizer")  # the production_optimizer stage
    assert recorded == {"learned_optimizer": {"name": NAME, "version": "1", "run_id": production.run_id, "uri": f"models:/{NAME}/1"}}
    lines = []
    metrics = evaluate.evaluate_production(p, tmp_path, pools, progress=lines.append)
    report = json.loads((tmp_path / "metrics" / "learned_optimizer" / "report.json").read_text())
    suites = {f"{pool}/{arch}" for pool in ("omniglot-test", "fashion-heldout") for arch in ("mlp", "conv", "mlp2")}
    assert set(report["suites"]) == suites and set(report["pooled"]) == {"seen", "unseen"}
    for by_optimizer in report["suites"].values():
        assert set(by_optimizer) == OPTIMIZERS
        for summary in by_optimizer.values():
            assert set(summary["at"]) == {"1x", "2x"} and summary["at"]["2x"]["step"] == 8
            assert [point["step"] for point in summary["curve"]] == [0, 2, 4, 6, 8]
            assert summary["at"]["1x"]["tasks"] == 2 and summary["update_ms"] > 0
    assert metrics["lr"]["adam_default"] == 1e-3 and metrics["lr"]["adam_tuned"] in (1e-3, 1e-2)
    assert "curve" not in metrics["pooled"]["seen"]["learned"]  # eval.json: numbers only
    assert json.loads((tmp_path / "metrics" / "learned_optimizer" / "eval.json").read_text())["version"] == "1"
    assert (tmp_path / "reports" / "learned_optimizer" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    summary_md = (tmp_path / "reports" / "learned_optimizer" / "summary.md").read_text()
    assert f"{NAME} v1" in summary_md and "| learned |" in summary_md
    csv_lines = (tmp_path / "metrics" / "learned_optimizer" / "curves.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(suites) * len(OPTIMIZERS) * 5
    run = mlflow.get_run(metrics["eval_run_id"])
    assert run.data.tags["evaluated_model"] == NAME and run.data.tags["evaluated_version"] == "1"
    assert "seen/learned/1x/train_loss_mean" in run.data.metrics
    assert any("tuned on" in line for line in lines)


def test_a_diverged_optimizer_is_never_saved_or_registered(tmp_path, mlflow_store, pools, monkeypatch):
    train = stage("optimizer_train")
    with pytest.raises(DivergenceError, match="refusing to save or register a diverged optimizer"):
        train.train_and_register(tiny_params(net={"output_scale": 1e6}), tmp_path, pools)  # diverges in meta-training
    # an optimizer that meta-trains without incident but diverges on the validation tasks is refused too
    monkeypatch.setattr(train, "meta_train_optimizer", lambda *args, **kwargs: SimpleNamespace(history=[{"step": 1}], seconds=0.0))
    with pytest.raises(DivergenceError, match=r"diverged on validation task .*refusing to save or register"):
        train.train_and_register(tiny_params(net={"output_scale": 1e6}), tmp_path, pools)
    assert not (tmp_path / "models" / "learned_optimizer").exists()
    assert not (tmp_path / "runs" / "learned_optimizer" / "train.json").exists()
    assert not any(m.name == NAME for m in mlflow.MlflowClient().search_registered_models())
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 2 and all(r.info.status == "FAILED" and r.data.tags["diverged"] == "true" for r in runs)


def test_an_interrupted_run_resumes_into_its_mlflow_run(tmp_path, mlflow_store, pools):
    train = stage("optimizer_train")
    distribution = train.meta_training_distribution
    drawn = []

    def signalling(op, pools, device):
        tasks = distribution(op, pools, device)

        def factory(seed: int):
            drawn.append(seed)
            if len(drawn) == 2:  # the second task, drawn by meta-step 3 of 4: SIGTERM stops the loop after it
                os.kill(os.getpid(), signal.SIGTERM)
            return tasks(seed)

        return factory

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupted, match="interrupted at step 3 by SIGTERM; checkpoint"):
        patch.setattr(train, "meta_training_distribution", signalling)
        train.train_and_register(tiny_params(), tmp_path, pools)
    checkpoints = tmp_path / "checkpoints" / "learned_optimizer"
    run_id = (checkpoints / "mlflow_run_id").read_text()
    assert mlflow.get_run(run_id).info.status == "KILLED" and not (tmp_path / "models" / "learned_optimizer").exists()
    out = train.train_and_register(tiny_params(), tmp_path, pools)  # resumes mid-horizon: the factory rebuilds task 2
    assert out["run_id"] == run_id and out["meta_train_steps"] == 4 and mlflow.get_run(run_id).info.status == "FINISHED"
    curve = (tmp_path / "metrics" / "learned_optimizer" / "meta_curve.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve] == ["step", "0", "1", "2", "3"]  # the rows before the stop too
    assert not checkpoints.exists()


def test_eval_without_production_says_how_to_get_one(tmp_path, mlflow_store, pools):
    """optimizer_eval reads production/optimizer.json, which production_optimizer writes from the alias."""
    train, evaluate, production = stage("optimizer_train"), stage("optimizer_eval"), stage("production")
    p = tiny_params(promote_first=False)
    with pytest.raises(DataError, match=r"production/optimizer.json is missing: run `dvc repro` \(its production_\* stage"):
        evaluate.evaluate_production(p, tmp_path, pools)
    with pytest.raises(RegistryError, match=rf"no registered model named '{NAME}'"):
        production.resolve(p, tmp_path, "optimizer")
    out = train.train_and_register(p, tmp_path, pools)
    assert not out["promoted"]
    with pytest.raises(RegistryError, match=rf"no 'production' version; promote one with `metaflowlib promote {NAME} <version>`"):
        production.resolve(p, tmp_path, "optimizer")
    assert not (tmp_path / "production" / "optimizer.json").exists()

    registry.promote(NAME, "1", "val_loss_drop")
    assert production.resolve(p, tmp_path, "optimizer")["learned_optimizer"]["version"] == "1"
    assert train.train_and_register(p, tmp_path, pools)["version"] == "2"
    registry.promote(NAME, "2", "val_loss_drop", force=True)  # production moved after the file was written
    with pytest.raises(RegistryError, match=rf"production/optimizer.json names {NAME} v1 but {NAME} production is v2: run `dvc repro`"):
        evaluate.evaluate_production(p, tmp_path, pools)
    assert not (tmp_path / "metrics" / "learned_optimizer" / "eval.json").exists()


def test_pyfunc_replays_gradients_through_the_lstm_and_refuses_bad_payloads(tmp_path, mlflow_store):
    from metaflowlib.serving.learned_optimizer import LearnedOptimizerModel, log_optimizer_model
    from metaflowlib.serving.log import unwrap_registered

    torch.manual_seed(0)
    net = LSTMOptimizerNet(hidden_size=4)
    with mlflow.start_run():
        uri = log_optimizer_model(save_optimizer(net, tmp_path / "optimizer"))
    model = mlflow.pyfunc.load_model(uri)
    grads = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    updates = model.predict({"gradients": grads})["updates"]
    state, expected = net.zero_state(5), []
    with torch.no_grad():
        for g in torch.from_numpy(grads):
            update, state = net(g, state)
            expected.append(update.numpy())
    np.testing.assert_allclose(updates, np.stack(expected), rtol=1e-6)
    python_model = unwrap_registered(uri, LearnedOptimizerModel)  # behind MLflow's schema check, the contract's own
    for bad in ({"images": grads}, {"gradients": grads[0]}, {"gradients": grads.astype(np.int64)},
                {"gradients": np.full((2, 2), np.nan, np.float32)}):
        with pytest.raises(PayloadError, match="gradients"):
            python_model.predict(None, bad)
    assert python_model.net.config() == net.config()


@pytest.mark.parametrize("change,message", [
    ({"evaluate": {"unseen_model": "conv"}}, "evaluate.unseen_model 'conv' is one of the meta-training models"),
    ({"meta_train": {"horizon": 5}}, "horizon 5 must be a multiple of unroll 2"),
    ({"fashion": {"eval_classes": [2, 6]}}, "overlap"),
    ({"omniglot": {"train_per_class": 19}}, "= 21 exceeds the 20 drawings per Omniglot class"),
    ({"models": ["mlp", "resnet"]}, "optimizer.models.1"),
])
def test_bad_optimizer_params_name_the_field(change, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    section = json.loads(json.dumps(TINY))
    for key, value in change.items():
        section[key] = {**section[key], **value} if isinstance(value, dict) else value
    raw["optimizer"] = section
    with pytest.raises(ConfigError, match=message):
        parse_params(raw, optimizer=LearnedOptimizerParams)


def test_a_seed_fixes_the_task_and_eval_pools_hold_no_meta_training_class(pools):
    from metaflowlib.learned_optimizer.suites import evaluation_suites, meta_training_distribution

    op = tiny_params().optimizer
    distribution = meta_training_distribution(op, pools)
    a, b = distribution.classifier_task(7), distribution.classifier_task(7)
    assert all(torch.equal(a.optimizee.params[k], b.optimizee.params[k]) for k in a.optimizee.params)
    assert torch.equal(a.optimizee.loss(a.optimizee.params, 3), b.optimizee.loss(b.optimizee.params, 3))
    assert not set(pools["fashion-train"].classes) & set(pools["fashion-heldout"].classes)
    suites = evaluation_suites(op, pools)
    assert set(suites) == {f"{pool}/{arch}" for pool in ("omniglot-test", "fashion-heldout") for arch in ("mlp", "conv", "mlp2")}


def test_a_diverging_run_is_cut_and_counted_never_averaged(pools):
    from metaflowlib.learned_optimizer.benchmark import run_trajectory, summarize
    from metaflowlib.methods.inner_optimizers import SGD
    from metaflowlib.learned_optimizer.suites import meta_training_distribution

    task = meta_training_distribution(tiny_params().optimizer, pools).classifier_task(0)
    diverged = run_trajectory(task, SGD(1e6), steps=8, record_every=2, divergence_factor=10)
    fine = run_trajectory(task, SGD(1e-2), steps=8, record_every=2, divergence_factor=10)
    assert diverged.diverged_at is not None and diverged.at(8) is None and fine.diverged_at is None
    summary = summarize([diverged, fine], {"1x": 4, "2x": 8})
    assert summary["at"]["2x"]["diverged"] == 1 and summary["at"]["2x"]["train_loss_mean"] == fine.train_loss[-1]
