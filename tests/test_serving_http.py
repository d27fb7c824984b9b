"""`mlflow models serve` answers real HTTP requests with the predict contract (a few-shot learner per request)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from metaflowlib import registry
from test_registry import NAME, new_version
from test_serving import payload


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


@pytest.fixture
def server(tmp_path, mlflow_store):
    registry.promote(NAME, new_version(tmp_path, 0.9), "acc_5w1s")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@production", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/ping", timeout=2).close()
            break
        except OSError:
            assert process.poll() is None and time.time() < deadline, "the model server did not start"
            time.sleep(0.5)
    yield base
    process.terminate()
    process.wait(timeout=30)


def test_served_model_labels_new_classes_and_refuses_bad_requests(server):
    task = payload()
    status, answer = post(f"{server}/invocations", {"inputs": {k: v.tolist() for k, v in task.items()}})
    assert status == 200
    local = registry.load_production(NAME).predict(task)  # the same registered omega, in-process
    assert answer["predictions"]["labels"] == local["labels"].tolist()
    assert np.allclose(answer["predictions"]["probabilities"], local["probabilities"], atol=1e-5)

    bad = {k: v.tolist() for k, v in payload(support_labels=np.array([0, 0, 1, 1, 3, 3])).items()}
    status, answer = post(f"{server}/invocations", {"inputs": bad})
    assert 400 <= status < 500
    assert "every class 0..N-1" in answer.get("stack_trace", "") + answer["message"]
