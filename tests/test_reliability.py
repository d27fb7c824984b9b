"""The issue's reliability bullets that have no home of their own: reproducibility of every method,
and two processes sharing one MLflow SQLite store."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import mlflow
import pytest
import torch

from metaflowlib import registry
from metaflowlib.episodes import EpisodeSampler
from metaflowlib.evaluate import evaluate_protocol
from metaflowlib.methods import METHODS, build_method
from metaflowlib.runtime import seed_everything
from metaflowlib.train import MetaTrainer, build_meta_optimizer

from conftest import ROOT
from test_registry import NAME, new_version

TINY = {  # the smallest configuration of each kind that still runs its inner loop
    "protonet": {"hidden": 4},
    "maml": {"ways": 5, "hidden": 4, "inner_steps": 1, "inner_steps_eval": 1},
    "fomaml": {"ways": 5, "hidden": 4, "inner_steps": 1, "inner_steps_eval": 1},
    "reptile": {"ways": 5, "hidden": 4, "inner_steps": 1, "inner_steps_eval": 1},
    "imaml": {"ways": 5, "hidden": 4, "inner_steps": 2, "inner_steps_eval": 1, "cg_steps": 2},
    "param_prediction": {"hidden": 4, "predictor_hidden": 8},
}


def train_and_evaluate(kind: str, pool, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny budget of meta-training, then the evaluation protocol (the path of `train@` + `evaluate@`): (5w1s score, omega)."""
    seed_everything(seed)
    method = build_method(kind, **TINY[kind])
    optimizer, scheduler = build_meta_optimizer(method, "sgd", 0.1, 100, 1.0)
    sampler = EpisodeSampler(pool, 5, 1, 2, tasks=2, seed=seed)
    MetaTrainer(method, sampler, optimizer, scheduler, validate=lambda m: 0.0, val_every=100, max_episodes=3,
                max_seconds=None, progress="off").run()
    report = evaluate_protocol(method, pool, {"5w1s": (5, 1)}, episodes=8, queries=3, seed=seed + 1, timing_tasks=1)
    return report["settings"]["5w1s"], method.state_dict()


@pytest.mark.usefixtures("one_thread")
def test_same_seed_gives_identical_metrics_and_episodes_for_every_method(tiny_pool):
    assert set(TINY) == set(METHODS), "a new method kind needs a tiny configuration here"
    digests = set()
    for kind in TINY:
        (first, omega), (second, again) = train_and_evaluate(kind, tiny_pool, seed=3), train_and_evaluate(kind, tiny_pool, seed=3)
        assert first == second, kind  # accuracy, CI and episode digest, bit for bit
        assert all(torch.equal(omega[k], again[k]) for k in omega), kind
        digests.add(first["digest"])
    assert len(digests) == 1  # every method was scored on the same tasks
    other, _ = train_and_evaluate("protonet", tiny_pool, seed=4)
    assert other["digest"] not in digests  # the digest does see the seed


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated, empty SQLite store, made once: each test copies it instead of spending seconds on migrations."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    mlflow.MlflowClient(uri, uri).search_experiments()
    return path


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    """A fresh copy of the empty store as the active tracking and registry URI."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


WRITER = """
import pathlib, sys, time
import mlflow
from metaflowlib import registry, tracking
from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.methods import ProtoNet
from metaflowlib.serving.fewshot import log_pyfunc_model

uri, worker, runs, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])
tracking.configure(uri)
experiment = tracking.experiment_id("shared", str(root / "artifacts"))
omega = save_meta_knowledge(ProtoNet(hidden=4), root / f"omega-{worker}", {"image_size": 28})
(root / f"ready-{worker}").touch()
while len(list(root.glob("ready-*"))) < 2:  # start writing together: the point is the overlap
    time.sleep(0.01)
for i in range(runs):
    with mlflow.start_run(experiment_id=experiment, run_name=f"{worker}-{i}") as run:
        mlflow.log_params({"worker": worker, "i": i})
        log = tracking.MetricLogger(run.info.run_id)
        for step in range(10):
            log({"train_loss": 1.0 / (step + 1)}, step)
        model_uri = log_pyfunc_model(omega)
    registry.register(model_uri, "shared-model", {"writer": f"{worker}-{i}"}, f"{worker} {i}", "two writers")
"""


def wait_all(processes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, in order."""
    outputs = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, *out) for p, out in zip(processes, outputs)]


def test_two_processes_writing_one_sqlite_store_lose_nothing(tmp_path, store):
    """Two pipeline-like writers (runs, params, metric batches, pyfunc models, registry versions) at once."""
    from metaflowlib import tracking

    tracking.experiment_id("shared", str(tmp_path / "artifacts"))  # an existing store: see README, Concurrency
    runs = 3
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, store, worker, str(runs), str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for worker in "AB"]
    for code, _, err in wait_all(writers):
        assert code == 0, err
    found = mlflow.search_runs(experiment_names=["shared"], output_format="list")
    assert sorted(r.info.run_name for r in found) == sorted(f"{w}-{i}" for w in "AB" for i in range(runs))
    client = mlflow.MlflowClient()
    for run in found:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(10))
    versions = client.search_model_versions("name='shared-model'")
    assert sorted(int(v.version) for v in versions) == list(range(1, 2 * runs + 1))
    assert sorted(v.tags["writer"] for v in versions) == sorted(f"{w}-{i}" for w in "AB" for i in range(runs))
    database = store.removeprefix("sqlite:///")
    assert sqlite3.connect(database).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_two_processes_creating_one_new_store_and_experiment(tmp_path):
    """The first `dvc repro` of two pipelines at once: neither the store's schema nor the experiment exists yet."""
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, uri, worker, "1", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for worker in "AB"]
    for code, _, err in wait_all(writers):
        assert code == 0, err
    client = mlflow.MlflowClient(uri, uri)
    assert [e.name for e in client.search_experiments() if e.name == "shared"] == ["shared"]
    assert sorted(r.info.run_name for r in client.search_runs([client.get_experiment_by_name("shared").experiment_id])) == ["A-0", "B-0"]


def promote_at_once(store: str, *versions: str) -> list[tuple[int, str, str]]:
    command = [sys.executable, "-m", "metaflowlib.cli", "--params", str(ROOT / "params.yaml"), "--tracking-uri", store, "promote", NAME]
    return wait_all([subprocess.Popen([*command, v], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in versions])


def production_and_history() -> tuple[str, list[str]]:
    tags = mlflow.MlflowClient().get_registered_model(NAME).tags
    return registry.get_alias(NAME).version, json.loads(tags[registry.HISTORY_TAG])


def test_promotes_at_once_are_serialized_and_leave_one_consistent_history(tmp_path, store):
    """`metaflowlib promote` of v2 twice and of v3, all at once, over production v1 (v3 > v2 > v1 on the gate)."""
    registry.promote(NAME, new_version(tmp_path, 0.90), "acc_5w1s")
    v2, v3 = new_version(tmp_path, 0.95), new_version(tmp_path, 0.97)
    (code_a, out_a, err_a), (code_b, out_b, err_b), (code_c, out_c, err_c) = promote_at_once(store, v2, v2, v3)
    assert code_c == 0 and out_c.startswith("promoted toy-protonet v3"), err_c
    v2_promoted = 0
    for code, out, err in ((code_a, out_a, err_a), (code_b, out_b, err_b)):
        if code == 2:  # v3 was production by then: one clear refusal, nothing moved
            assert err.strip().splitlines()[-1].startswith(
                "error: refusing to promote toy-protonet v2: acc_5w1s 0.9500 vs production v3's 0.9700: difference -0.0"), err
        else:
            assert code == 0, err
            v2_promoted += out.startswith("promoted toy-protonet v2")
            assert out.startswith(("promoted toy-protonet v2", "toy-protonet version 2 is already production")), out
    assert v2_promoted <= 1
    production, history = production_and_history()
    assert production == "3" and history == ["1", "2"][: 1 + v2_promoted]  # every replaced version once, in order


FIRST_PROMOTER = """
import sys, mlflow
from metaflowlib import registry
uri, version = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
print(registry.promote_if_none(sys.argv[3], version, "acc_5w1s"))
"""


def test_two_first_registrations_at_once_promote_exactly_one(tmp_path, store):
    """Two pipelines' register stages, each finding no production: only one may promote (the pipeline's promote_first)."""
    v1, v2 = new_version(tmp_path, 0.90), new_version(tmp_path, 0.95)
    results = wait_all([subprocess.Popen([sys.executable, "-c", FIRST_PROMOTER, store, v, NAME], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True) for v in (v1, v2)])
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    said = [out.strip() for _, out, _ in results]
    assert sorted(line == "None" for line in said) == [False, True]  # one promoted, the other saw production and left it
    winner = v1 if said[0] != "None" else v2
    assert production_and_history() == (winner, [])
