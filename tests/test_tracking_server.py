"""A team's setup: `mlflow server` over PostgreSQL with proxied artifacts, the project's code as its client.

PostgreSQL is started from its binaries into a temporary directory, on a free
loopback port, as an unprivileged user when the tests run as root (postgres
refuses root). No PostgreSQL is a failure, not a skip: `.ci/run` installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import psycopg
import pytest
import torch
from conftest import ROOT, register_evaluated
from test_serving import payload

from metaflowlib import entry, registry, tracking
from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.cli import main as cli
from metaflowlib.episodes import EpisodeSampler
from metaflowlib.evaluate import embed_pool, evaluate_protocol, evaluate_setting
from metaflowlib.methods import ProtoNet
from metaflowlib.serving.contract import predict_task
from metaflowlib.serving.fewshot import log_pyfunc_model
from metaflowlib.train import MetaTrainer, build_meta_optimizer

NAME = "team-protonet"
DB_USER = "mlflow"
DB_NAME = "mlflow"
START_SECONDS = 90  # the server's first start creates MLflow's schema in the new database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_binary(name: str) -> str:
    """`name` from PATH, else from the newest Debian /usr/lib/postgresql/<major>/bin (which is not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not debian:
        pytest.fail(f"PostgreSQL's {name} is not on PATH nor in /usr/lib/postgresql/*/bin: "
                    "install it (`apt-get install postgresql`, as .ci/run does)")
    return str(debian[-1])


def server_user() -> dict[str, Any]:
    """Popen arguments that run postgres as a non-root user (it refuses to start as root); none when not root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):  # Debian's package creates `postgres`; `nobody` exists everywhere else
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    pytest.fail("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def wait_until(ready, process: subprocess.Popen, what: str, log: Path, seconds: float) -> None:
    """Poll `ready()` until it is true; fail naming `what` and its log if the process dies or time runs out."""
    deadline = time.monotonic() + seconds
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {process.returncode}" if process.returncode is not None else f"not ready after {seconds:.0f}s"
            pytest.fail(f"{what} {state}; its log:\n{tail(log)}")
        time.sleep(0.3)


@dataclass(frozen=True)
class Postgres:
    port: int

    def connect(self, dbname: str = DB_NAME) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=DB_USER, dbname=dbname, connect_timeout=5, autocommit=True)

    @property
    def uri(self) -> str:
        """The driver named: a bare postgresql:// means psycopg 3 to SQLAlchemy 2.1 but psycopg2 to 2.0."""
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster (trust auth, loopback only) with an empty `mlflow` database."""
    run_as = server_user()
    # not under pytest's tmp_path: that is private to root, and the server user must reach its data directory
    base = Path(tempfile.mkdtemp(prefix="metaflowlib-pg-"))
    if run_as:
        os.chown(base, run_as["user"], run_as["group"])
    log = base / "postgres.log"
    process = None
    try:
        initdb = subprocess.run([postgres_binary("initdb"), "-D", str(base / "data"), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
                                 "--no-sync"], cwd=base, capture_output=True, text=True, check=False, **run_as)
        if initdb.returncode != 0:
            pytest.fail(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}{initdb.stderr}")
        server = Postgres(free_port())
        with log.open("w") as out:
            process = subprocess.Popen(
                [postgres_binary("postgres"), "-D", str(base / "data"), "-p", str(server.port), "-k", str(base),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"], cwd=base, stdout=out, stderr=subprocess.STDOUT, **run_as)

        def accepts() -> bool:
            try:
                server.connect("postgres").close()
                return True
            except psycopg.OperationalError:
                return False

        wait_until(accepts, process, "PostgreSQL", log, 30)
        with server.connect("postgres") as connection:  # autocommit: CREATE DATABASE refuses a transaction block
            connection.execute(f"CREATE DATABASE {DB_NAME}")
        yield server
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, no waiting for clients
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True)
class Server:
    url: str
    artifacts: Path
    database: Postgres


@pytest.fixture
def mlflow_server(postgres: Postgres, tmp_path: Path) -> Iterator[Server]:
    """`mlflow server` over the PostgreSQL store, serving artifacts from a local directory through its proxy."""
    artifacts, log, port = tmp_path / "server-artifacts", tmp_path / "mlflow-server.log", free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.uri, "--serve-artifacts",
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env={**os.environ, **entry.QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no GenAI job workers
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, process, "mlflow server", log, START_SECONDS)
        yield Server(url, artifacts, postgres)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that failed to start may have left no process
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the web workers go with it
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def train_and_log(pool, experiment: str, omega_dir: Path) -> tuple[ProtoNet, str, dict]:
    """A tiny ProtoNet through the training loop and its pyfunc model logged to one run, as train@ does, then scored
    by the evaluation protocol; returns (omega, model URI, the 5w1s result with its per-task accuracies)."""
    torch.manual_seed(0)
    method = ProtoNet(hidden=8)
    optimizer, scheduler = build_meta_optimizer(method, "adam", 1e-2, 100, 0.5)
    sampler = EpisodeSampler(pool, 5, 1, 2, tasks=2, seed=0)

    def validate(m) -> float:
        m.eval()  # as train@'s validator: a ProtoNet is scored on embedded examples
        return evaluate_setting(m, pool, embed_pool(m, pool, None), 5, 1, 2, 10, 1, 10, None).accuracy

    with mlflow.start_run(experiment_id=experiment, run_name="protonet") as run:
        result = MetaTrainer(method, sampler, optimizer, scheduler, validate=validate, val_every=5, max_episodes=10,
                             max_seconds=None, log=tracking.MetricLogger(run.info.run_id), progress="off").run()
        mlflow.log_metrics({"meta_train_seconds": result.seconds})
        model_uri = log_pyfunc_model(save_meta_knowledge(method, omega_dir, {"image_size": 28}))
    report = evaluate_protocol(method, pool, {"5w1s": (5, 1)}, episodes=20, queries=2, seed=2, timing_tasks=3)
    return method, model_uri, {**report["settings"]["5w1s"], "task_accuracies": report["task_accuracies"]["5w1s"]}


LOAD_AND_PREDICT = """
import json, sys
import numpy as np, mlflow.pyfunc
task = dict(np.load(sys.argv[1]))
out = mlflow.pyfunc.load_model(sys.argv[2]).predict(task)
print(json.dumps({"labels": out["labels"].tolist(), "probabilities": out["probabilities"].tolist()}))
"""


def test_train_register_promote_and_serve_through_a_postgres_backed_server(mlflow_server, tiny_pool, tmp_path, monkeypatch,
                                                                          capsys, one_thread):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.chdir(tmp_path)
    assert tracking.configure("sqlite:///params-store.db") == mlflow_server.url  # the environment wins over params
    experiment = tracking.experiment_id("team", str(tmp_path / "unused"))
    assert mlflow.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:/")  # the server's proxy

    method, model_uri, scored = train_and_log(tiny_pool, experiment, tmp_path / "omega")
    # as evaluate@ + register@: an evaluation run (metric and per-task artifact, uploaded through the proxy) per version;
    # v2 is the same omega evaluated again on the same tasks, so it cannot beat v1
    v1, v2 = (register_evaluated(model_uri, NAME, scored["task_accuracies"], protocol="tiny", digest=scored["digest"],
                                 experiment_id=experiment, tags={"method": "protonet"}, model_description="team test")
              for _ in range(2))

    params = str(ROOT / "params.yaml")
    cli(["--params", params, "promote", NAME, v1])
    assert f"promoted {NAME} v{v1}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        cli(["--params", params, "promote", NAME, v2])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 2 and err == (
        f"error: refusing to promote {NAME} v{v2}: acc_5w1s {scored['accuracy']:.4f} vs production v{v1}'s {scored['accuracy']:.4f}: "
        "difference +0.0000, 95% interval [+0.0000, +0.0000] (paired bootstrap over 20 shared tasks) (use --force to override)")

    # the registry lives in PostgreSQL, the weights in the server's artifact directory (uploaded through its proxy)
    with mlflow_server.database.connect() as connection:
        aliases = connection.execute("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
                                     (NAME, registry.ALIAS)).fetchall()
        losses = connection.execute("SELECT count(*) FROM metrics WHERE key = 'train_loss'").fetchone()[0]
    assert aliases == [(int(v1),)] and losses > 0
    weights = (tmp_path / "omega" / "model.safetensors").read_bytes()
    assert any(p.read_bytes() == weights for p in mlflow_server.artifacts.rglob("model.safetensors"))

    # a second process with nothing but the server's URL loads production and labels a new task
    task = payload()
    np.savez(tmp_path / "task.npz", **task)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, **entry.QUIET_ENV, "MLFLOW_TRACKING_URI": mlflow_server.url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # this checkout's model code
    loaded = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, str(tmp_path / "task.npz"), f"models:/{NAME}@production"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answer = json.loads(loaded.stdout.strip().splitlines()[-1])
    local = predict_task(method, task, 28, torch.device("cpu"))
    assert answer["labels"] == local["labels"].tolist()
    assert np.allclose(answer["probabilities"], local["probabilities"], atol=1e-5)
