"""`mlflow models serve` answers real HTTP requests with the predict contract (a few-shot learner per request),
from a process in which this checkout's metaflowlib cannot be imported: only the copy the model ships can load."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import ROOT
from test_registry import NAME, new_version
from test_serving import payload, rgb_task

from metaflowlib import registry
from metaflowlib.errors import PayloadError

# Run at start-up by every Python process of the server (PYTHONPATH): a metaflowlib found in this checkout is
# refused, any other (the model's code/ copy) is recorded in $SERVED_FROM.
BLOCKER = '''
import importlib.abc, os, sys

class NoCheckout(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "metaflowlib":
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.origin and spec.origin.startswith(os.environ["CHECKOUT"] + os.sep):
            raise ImportError(f"metaflowlib of the checkout {spec.origin} is blocked")
        with open(os.environ["SERVED_FROM"], "a") as log:
            log.write(spec.origin + "\\n")
        return spec

sys.meta_path.insert(0, NoCheckout())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def as_json(task: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in task.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One registered toy ProtoNet in production, in a store for this module, with cwd outside the checkout."""
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        registry.promote(NAME, new_version(root, 0.9), "acc_5w1s")
        yield root
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def no_checkout(store):
    """The environment of a machine with mlflow and torch but not this project."""
    site = store / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(site), "CHECKOUT": str(ROOT), "SERVED_FROM": str(store / "served_from.txt")}


@contextlib.contextmanager
def serve(model_uri: str, env: dict, cwd: Path, log: Path):
    """`mlflow models serve` of `model_uri` on a free port until the block ends: yields its /invocations URL; a
    server that dies first fails with the tail of its log."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                                    "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=cwd, stdout=out, stderr=out)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(store, no_checkout):
    with serve(f"models:/{NAME}@production", no_checkout, store, store / "server.log") as url:
        yield url


def test_served_model_labels_new_classes_with_the_code_it_ships(store, no_checkout, server):
    task = payload()
    status, answer = post(server, {"inputs": as_json(task)})
    assert status == 200
    local = registry.load_production(NAME).predict(task)  # the same registered omega, in-process
    assert answer["predictions"]["labels"] == local["labels"].tolist()
    assert np.allclose(answer["predictions"]["probabilities"], local["probabilities"], atol=1e-5)

    blocked = subprocess.run([sys.executable, "-c", "import metaflowlib"], check=False, env=no_checkout, cwd=store,
                             capture_output=True, text=True)
    assert blocked.returncode != 0 and "is blocked" in blocked.stderr
    served_from = (store / "served_from.txt").read_text().split()
    assert served_from and all(Path(p).parts[-3:] == ("code", "metaflowlib", "__init__.py") for p in served_from)

    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}@production")).read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and not any("metaflowlib" in r for r in requirements)


def test_python_predict_gives_the_contracts_message(store):
    model = registry.load_production(NAME)  # mlflow.pyfunc: no input schema of MLflow's runs first
    with pytest.raises(PayloadError) as refused:
        model.predict(payload(support_images=np.zeros((6, 28, 28), np.float32)))
    assert str(refused.value) == "support_images must be uint8 (0 = ink, 255 = paper), got float32"
    with pytest.raises(PayloadError, match=r"^payload has unknown keys \['extra'\]"):
        model.predict(payload(extra=np.zeros(1)))


def test_mlflow_models_predict_works_without_the_project(store, no_checkout):
    (store / "task.json").write_text(json.dumps({"inputs": as_json(payload())}))
    subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", f"models:/{NAME}@production", "--env-manager", "local",
         "-i", "task.json", "-o", "answer.json", "-t", "json"], env=no_checkout, cwd=store, check=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answer = json.loads((store / "answer.json").read_text())
    assert answer["predictions"]["labels"] == registry.load_production(NAME).predict(payload())["labels"].tolist()


# each case of metaflowlib.serving.contract, as a new user sends it: refused with the contract's line, nothing cast
@pytest.mark.parametrize("changes,message", [
    ({"support_images": np.full((6, 28, 28), 0.5)}, "support_images must be uint8 (0 = ink, 255 = paper), got float64"),
    ({"query_images": np.full((6, 28, 28), 300)}, "query_images must be uint8 (0 = ink, 255 = paper), got int64 values in [300, 300]"),
    ({"support_labels": np.arange(6) % 3 + 0.5}, "support_labels must be integers 0..N-1 or class names (strings), got float64"),
    ({"extra": 1}, "payload has unknown keys ['extra']; expected keys ['support_images', 'support_labels', 'query_images']"),
    ({"query_images": None}, "query_images must have shape [count, height, width] or [count, height, width, 3] with no empty axis, got []"),
    ({"query_images": np.zeros((6, 28), np.uint8)}, "query_images must have shape [count, height, width] or [count, height, width, 3] with no empty axis, got [6, 28]"),
    ({"support_labels": np.array([0, 0, 1, 1, 3, 3])}, "support_labels must use every class 0..N-1 with N >= 2, got classes [0, 1, 3]"),
    ({"support_labels": np.arange(5) % 3}, "support_labels must have shape [6] (one per support image), got [5]"),
    ({"support_images": []}, "support_images must have shape [count, height, width] or [count, height, width, 3] with no empty axis, got [0]"),
    ({"support_labels": []}, "support_labels must have shape [6] (one per support image), got [0]"),
    ({"query_images": np.zeros((20001, 1, 1), np.uint8)}, "query_images too large: [20001, 1, 1] (at most 20000 images of side <= 1024)"),
    ({"support_images": np.zeros((6, 1, 1025), np.uint8)}, "support_images too large: [6, 1, 1025] (at most 20000 images of side <= 1024)"),
], ids=["float-images", "images-over-255", "float-labels", "unknown-key", "null", "2d-images", "labels-not-0..N-1",
        "fewer-labels", "empty-images", "empty-labels", "too-many-images", "too-wide"])
def test_bad_requests_get_the_contracts_one_line_and_a_400(server, changes, message):
    status, answer = post(server, {"inputs": as_json(payload(**changes))})
    assert (status, answer["message"]) == (400, message)


def test_missing_keys_and_non_dict_inputs(server):
    task = as_json(payload())
    del task["query_images"]
    status, answer = post(server, {"inputs": task})
    assert status == 400 and answer["message"].startswith("payload is missing ['query_images']")
    status, answer = post(server, {"inputs": [[1, 2], [3, 4]]})
    assert status == 400 and answer["message"] == "payload must be a dict with keys " \
        "['support_images', 'support_labels', 'query_images'], got ndarray"


def test_rgb_photographs_named_classes_and_the_strategy_param(store, server):
    """Contract v2 over HTTP: RGB images of another size to a grayscale model, class names, params {"strategy"}."""
    task = rgb_task()
    local = registry.load_production(NAME)
    for strategy in ("tent", "bn"):
        status, answer = post(server, {"inputs": as_json(task), "params": {"strategy": strategy}})
        expected = local.predict(task, params={"strategy": strategy})
        assert status == 200 and answer["predictions"]["classes"] == ["apple", "mango", "zebra"]
        assert answer["predictions"]["labels"] == expected["labels"].tolist()
        assert np.allclose(answer["predictions"]["probabilities"], expected["probabilities"], atol=1e-5)
    status, answer = post(server, {"inputs": as_json(task), "params": {"strategy": "ttt"}})
    assert (status, answer["message"]) == (400, "unknown strategy 'ttt'; known: source, bn, tent")


def test_the_server_still_answers_after_refusals(server):
    status, answer = post(server, {"inputs": as_json(payload())})
    assert status == 200 and answer["predictions"]["labels"] == registry.load_production(NAME).predict(payload())["labels"].tolist()
