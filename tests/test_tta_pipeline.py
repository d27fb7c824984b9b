"""The test-time adaptation stages end to end on a tiny synthetic Fashion-MNIST, against a throwaway MLflow store."""

from __future__ import annotations

import hashlib
import json
import os
import signal

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, class_images, load_stage as stage
from test_fashion_mnist import write_idx

from metaflowlib import registry, tracking
from metaflowlib.tta.strategies import TTTModel
from metaflowlib.config import parse_params
from metaflowlib.config.learned_optimizer import LearnedOptimizerParams
from metaflowlib.config.tta import TTAParams, TentStrategy
from metaflowlib.data.fashion_mnist import FILES, IMAGES_MAGIC, LABELS_MAGIC
from metaflowlib.errors import ConfigError, DataError, Interrupted, PayloadError, RegistryError
from metaflowlib.models import BatchNorm2d
from metaflowlib.tta.benchmark import adapter_options, evaluate_strategy
from metaflowlib.tta.classifier import build_classifier
from metaflowlib.tta.shifted import build_shifted, load_shifted

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = 20  # test images per corruption x severity
SOURCE, TTT = "fashion-mnist-source", "fashion-mnist-ttt"


def tiny_params(data_dir, promote_first: bool = True):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["registry"]["promote_first"] = promote_first
    raw["tta"].update(
        data={"source": str(data_dir), "verify_checksums": False, "images": IMAGES,
              "corruptions": ["gaussian_noise", "fog"], "severities": [1, 5]},
        training={"hidden": 4, "epochs": 1, "batch_size": 32, "precision": "fp32"},
        strategies={"source": {}, "bn": {"batch_size": 10}, "tent": {"batch_size": 10, "lr": 0.01},
                    "ttt": {"batch_size": 10}, "tent_episodic": {"kind": "tent", "episodic": True, "batch_size": 10}},
    )
    return parse_params(raw, tta=TTAParams, optimizer=LearnedOptimizerParams)


@pytest.fixture
def project(tmp_path, mlflow_store):
    """A project root with a synthetic Fashion-MNIST (separable stroke classes) and the MLflow store of `mlflow_store`."""
    data = tmp_path / "fashion-mnist"
    for split, (per_class, seed) in {"train": (20, 0), "test": (4, 1)}.items():
        images, labels = class_images(10, per_class, seed=seed)
        write_idx(data / FILES[(split, "images")], images, IMAGES_MAGIC)
        write_idx(data / FILES[(split, "labels")], labels, LABELS_MAGIC)
    root = tmp_path / "project"
    root.mkdir()
    return root, data


def digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.safetensors"))}


def test_data_source_model_strategies_report(project):
    root, data = project
    p = tiny_params(data)

    info = stage("tta_data").build(p, root)
    shifted = load_shifted(root / "data" / "tta" / "fashion-mnist-c")
    assert shifted.corrupted["fog"].shape == (2, IMAGES, 28, 28) and shifted.corrupted["fog"].dtype == np.uint8
    assert info["digest"] == stage("tta_data").build(p, root / "again")["digest"]  # deterministic per seed

    trained = stage("tta_source").train_and_register(p, root)
    assert {k: (v["name"], v["version"], v["promoted"]) for k, v in trained.items()} == {
        "source": (SOURCE, "1", True), "ttt": (TTT, "1", True)}
    production = stage("production").resolve(p, root, "tta")
    assert json.loads((root / "production" / "tta.json").read_text()) == production  # the file DVC hashes
    assert set(production) == {"source", "ttt"}  # no strategy here takes the learned optimizer
    assert production["ttt"] == {"name": TTT, "version": "1", "run_id": trained["ttt"]["run_id"], "uri": f"models:/{TTT}/1"}

    artifacts = tracking.store_root() / p.mlflow.artifact_location  # where stages put a local store's artifacts
    stored = digests(artifacts)
    assert len(stored) == 2  # the two registered classifiers' weights
    tta = stage("tta")
    results = {key: tta.run(p, key, root) for key in p.tta.strategies}
    assert digests(artifacts) == stored  # adaptation never touches the registered weights

    tent = results["tent"]
    assert set(tent["error"]) == {"gaussian_noise", "fog"} and set(tent["error"]["fog"]) == {"1", "5"}
    assert set(tent["mean_error"]) == {"1", "5"} and all(0 <= e <= 1 for e in tent["mean_error"].values())
    assert tent["mean_error"]["5"] == pytest.approx((tent["error"]["fog"]["5"] + tent["error"]["gaussian_noise"]["5"]) / 2)
    assert tent["batches"] == 5 * 2 and tent["ms_per_batch"] > 0  # 4 shifted sets + clean, 2 batches of 10 each
    assert tent["adapted_parameters"] == 4 * 2 * 4  # BatchNorm weight + bias of 4 channels in each of 4 blocks
    assert results["source"]["adapted_parameters"] == results["bn"]["adapted_parameters"] == 0
    assert json.loads((root / "metrics" / "tta" / "strategies" / "tent.json").read_text()) == tent
    assert (root / "metrics" / "tta" / "strategies" / "bn.csv").read_text().splitlines()[:2] == [
        "severity,mean_error", f"0,{results['bn']['error_clean']}"]

    for key, name in (("tent", SOURCE), ("ttt", TTT)):
        record = json.loads((root / "runs" / "tta" / "strategies" / f"{key}.json").read_text())
        run = mlflow.get_run(record["run_id"])
        assert run.data.tags["model_name"] == name and run.data.tags["model_version"] == "1"
        assert run.data.tags["memory_kind"] == record["memory_kind"] == "peak_rss_increase"  # Linux: VmHWM reset per strategy
        assert run.data.tags["model_run_id"] == trained[name.rsplit("-", 1)[1]]["run_id"]
        assert run.data.metrics["mean_error_s5"] == pytest.approx(results[key]["mean_error"]["5"])

    report = stage("tta_report").report(p, root)
    assert set(report["error_at_severity"]) == set(p.tta.strategies) and isinstance(report["paper_order"], bool)
    table = (root / "metrics" / "tta" / "report.md").read_text()
    assert "| strategy | model | gauss | fog | **mean** |" in table and f"| ttt | {TTT} v1 |" in table
    assert "| ms / batch (size) | peak memory MiB, peak_rss_increase | extra vs source (MiB) | adapted params |" in table
    assert (root / "metrics" / "tta" / "report.png").read_bytes()[:4] == b"\x89PNG"

    model = registry.load_production(TTT)
    out = model.predict({"images": shifted.clean[:3]})
    assert out["labels"].shape == (3,) and out["probabilities"].shape == (3, 10)
    with pytest.raises(PayloadError, match=r"images must be uint8 \[N, 28, 28\]"):
        model.predict({"images": shifted.clean[:3, :27, :27]})
    ttt_model = model.unwrap_python_model().wrapper.model
    assert isinstance(ttt_model, TTTModel) and ttt_model.rotation_logits(torch.zeros(2, 1, 28, 28)).shape == (2, 4)

    # a person promotes another version: the stages refuse to adapt it until production_tta has recorded it
    again = stage("tta_source").train_and_register(p, root)
    assert again["source"]["version"] == "2" and not again["source"]["promoted"]
    registry.promote(SOURCE, "2", "acc_clean", force=True)
    with pytest.raises(RegistryError, match=rf"names {SOURCE} v1 but {SOURCE} production is v2: run `dvc repro`"):
        tta.run(p, "bn", root)
    assert stage("production").resolve(p, root, "tta")["source"]["version"] == "2"
    assert tta.run(p, "bn", root)["batches"] == 10


def test_missing_production_alias_says_how_to_promote(project):
    root, data = project
    p = tiny_params(data, promote_first=False)
    stage("tta_data").build(p, root)
    trained = stage("tta_source").train_and_register(p, root)
    assert not trained["source"]["promoted"] and registry.get_alias(SOURCE) is None
    message = f"{SOURCE} has no 'production' version; promote one with `metaflowlib promote {SOURCE} <version>`"
    with pytest.raises(RegistryError, match=message):
        stage("production").resolve(p, root, "tta")
    assert not (root / "production" / "tta.json").exists()
    with pytest.raises(DataError, match=r"production/tta.json is missing: run `dvc repro` \(its production_\* stage records"):
        stage("tta").run(p, "tent", root)  # nothing recorded: the stage reads no alias of its own
    for name in (SOURCE, TTT):
        assert "promoted" in registry.promote(name, "1", "ignored: the version names its own gate metric")
    assert stage("production").resolve(p, root, "tta")["source"]["version"] == "1"


def test_an_interrupted_run_resumes_and_trains_no_classifier_twice(project):
    from metaflowlib.tta import classifier

    root, data = project
    p = tiny_params(data)
    losses, calls = classifier.training_loss, []

    def signalling(kind: str):
        loss = losses(kind)

        def on_second_ttt_batch(model, x, y):
            calls.append(kind)
            if calls.count("ttt") == 2:  # the twin's second minibatch of 7: SIGTERM stops the loop after it
                os.kill(os.getpid(), signal.SIGTERM)
            return loss(model, x, y)

        return on_second_ttt_batch

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupted, match=r"at step 2 by SIGTERM; checkpoint in .*tta_source/ttt"):
        patch.setattr(classifier, "training_loss", signalling)
        stage("tta_source").train_and_register(p, root)
    ttt_run = (root / "checkpoints" / "tta_source" / "ttt" / "mlflow_run_id").read_text()
    source_run = (root / "checkpoints" / "tta_source" / "source" / "mlflow_run_id").read_text()
    assert mlflow.get_run(ttt_run).info.status == "KILLED" and mlflow.get_run(source_run).info.status == "FINISHED"
    trained = stage("tta_source").train_and_register(p, root)
    assert (trained["source"]["run_id"], trained["ttt"]["run_id"]) == (source_run, ttt_run)
    assert trained["source"]["version"] == trained["ttt"]["version"] == "1"  # the source classifier was not retrained
    assert trained["ttt"]["train_steps"] == 7 and mlflow.get_run(ttt_run).info.status == "FINISHED"
    assert not (root / "checkpoints" / "tta_source").exists()


def test_promotion_gate_compares_clean_accuracy(project):
    root, data = project
    p = tiny_params(data)
    stage("tta_source").train_and_register(p, root)
    stage("tta_source").train_and_register(p, root)  # same seed: the same clean accuracy, which does not beat it
    clean = mlflow.get_run(registry.get_version(SOURCE, "1").run_id).data.metrics["acc_clean"]  # read from the run
    # a classifier's clean accuracy has no per-task form: the candidate's point estimate must exceed production's
    with pytest.raises(RegistryError, match=rf"refusing to promote {SOURCE} v2: acc_clean {clean:.4f} vs production v1's {clean:.4f}: "
                                            r"v2 and v1 stored no per-task accuracies .* the candidate's point estimate must exceed "
                                            r"production's \(use --force"):
        registry.promote(SOURCE, "2", "acc_5w1s")


def test_every_shifted_set_starts_from_the_source_weights():
    """Online TENT at a large step size: a set's error must not depend on the sets evaluated before it."""
    torch.manual_seed(0)
    model = build_classifier("source", num_classes=10, image_size=28, hidden=4).eval()
    images, labels = class_images(10, 4, seed=3)
    both = build_shifted(images, labels, 40, ("gaussian_noise", "fog"), (3, 5), seed=0)
    alone = build_shifted(images, labels, 40, ("fog",), (3, 5), seed=0)
    assert np.array_equal(alone.corrupted["fog"], both.corrupted["fog"])  # per-corruption noise streams
    options = {"optimizer": lambda params: torch.optim.Adam(params, lr=0.5)}
    after_noise = evaluate_strategy("tent", model, options, both, 8, torch.device("cpu"))
    first = evaluate_strategy("tent", model, options, alone, 8, torch.device("cpu"))
    assert after_noise.errors["fog"] == first.errors["fog"]
    assert after_noise.clean_error == first.clean_error
    assert len(first.batch_ms) == 3 * 5  # 2 severities + clean, 40 images in 5 batches of 8
    for layer in model.modules():  # the caller's model is untouched, running statistics included
        if isinstance(layer, BatchNorm2d):
            assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.running_var, torch.ones(4))


def test_batches_are_cut_evenly_so_none_has_a_single_image():
    model = build_classifier("source", num_classes=10, image_size=28, hidden=4).eval()
    images, labels = class_images(7, 3)
    shifted = build_shifted(images, labels, 21, ("fog",), (1,), seed=0)
    result = evaluate_strategy("bn", model, {}, shifted, 20, torch.device("cpu"))  # 21 = 11 + 10, never 20 + 1
    assert len(result.batch_ms) == 2 * 2


def test_params_tta_block():
    p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()), tta=TTAParams)
    assert list(p.tta.strategies) == ["source", "bn", "tent", "tent_learned", "ttt"]
    assert p.tta.strategies["tent_learned"].kind == "tent" and p.tta.strategies["tent_learned"].optimizer == "learned"
    assert p.tta.strategies["tent"] == TentStrategy(kind="tent", optimizer="adam", lr=1e-3, batch_size=200, steps=1, episodic=False)
    assert p.tta.strategies["ttt"].model == "ttt" and p.tta.strategies["bn"].model == "source"
    assert p.tta.registered_name("ttt") == TTT
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tta"]["strategies"] = {"tent": {"optimizer": "adam", "momentum": 0.9, "lr": 0}, "mine": {"lr": 1}}
    with pytest.raises(ConfigError, match=r"tta: strategies.mine needs a kind \(one of bn, source, tent, ttt\)"):
        parse_params(raw, tta=TTAParams)
    raw["tta"]["strategies"] = {"tent": {"momentum": 0.9}, "ttt_std": {"kind": "ttt", "lr": 0, "oops": 1}}
    raw["tta"]["data"] = {"corruptions": ["fog", "rain"], "severities": [5, 5]}
    with pytest.raises(ConfigError) as error:
        parse_params(raw, tta=TTAParams)
    lines = str(error.value).splitlines()[1:]
    assert any(line.startswith("  tta.data.corruptions.1: Input should be 'gaussian_noise'") for line in lines)
    assert "  tta.strategies.ttt_std.lr: Input should be greater than 0 (got 0)" in lines
    assert "  tta.strategies.ttt_std.oops: Extra inputs are not permitted (got 1)" in lines
    with pytest.raises(ConfigError, match="no strategy 'gone' in params.yaml tta.strategies"):
        p.tta.strategy("gone")


def test_tent_takes_the_learned_optimizer_as_its_update_rule():
    from metaflowlib.tta.strategies import build_adapter
    from metaflowlib.learned_optimizer.learned import LSTMOptimizerNet

    torch.manual_seed(0)
    strategy = TentStrategy(kind="tent", optimizer="learned")
    with pytest.raises(ValueError, match="needs the registered learned optimizer"):
        adapter_options(strategy)
    model = build_classifier("source", 10, 28, 4)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = build_adapter("tent", model, **adapter_options(strategy, LSTMOptimizerNet(hidden_size=4, output_scale=1.0)))
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    for _ in range(2):  # online: the LSTM's memory and the BN affine parameters carry over
        adapter.predict(torch.rand(16, 1, 28, 28))
    moved = {k for k, v in adapter.model.state_dict().items() if not torch.equal(v, before[k])}
    affine = {f"{name}.{p}" for name, m in adapter.model.named_modules() if isinstance(m, (torch.nn.BatchNorm2d, BatchNorm2d))
              for p in ("weight", "bias")}
    assert moved and moved <= affine
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())  # the source model is untouched
