import os
import subprocess
import sys

import pytest

from metaflowlib.cli import main

from conftest import ROOT


def run(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "metaflowlib.cli", *args], check=False, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_check_accepts_the_shipped_params():
    result = run("check")
    assert result.returncode == 0, result.stderr
    assert "params.yaml: valid; profile default, dataset omniglot-vinyals, methods: protonet (protonet)" in result.stdout


def test_check_names_the_bad_field_without_a_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("lr: 0.001", "lr: -1"))
    result = run("--params", str(bad), "check")
    assert result.returncode == 2
    assert "methods.protonet.meta_optimizer.lr: Input should be greater than 0 (got -1)" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_tracking_server_is_one_clear_error(tmp_path):
    result = run("--tracking-uri", "http://127.0.0.1:9", "models", "list")
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot reach the MLflow tracking server at http://127.0.0.1:9")


def test_unwritable_sqlite_location_is_refused(tmp_path):
    result = run("--tracking-uri", f"sqlite:///{tmp_path}/missing/dir/mlflow.db", "models", "list")
    assert result.returncode == 2 and "does not exist or is not writable" in result.stderr


@pytest.mark.parametrize("args,message", [
    ([], "the following arguments are required: command"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    (["models"], "the following arguments are required: action"),
    (["promote", "toy"], "the following arguments are required: version"),
    (["promote", "toy", "2", "--forse"], "unrecognized arguments: --forse"),
    (["rollback", "toy", "2"], "unrecognized arguments: 2"),
    (["--params", "/no/such/params.yaml", "models", "list"], "error: /no/such/params.yaml not found"),
])
def test_bad_arguments_exit_2_with_one_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_a_store_mlflow_cannot_open_is_one_error_and_the_flag_beats_the_environment(tmp_path):
    result = run("--params", str(ROOT / "params.yaml"), "--tracking-uri", "not-a-store", "models", "list", cwd=tmp_path,
                 env={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 2 and result.stderr.startswith("error: cannot open the MLflow store 'not-a-store'")
    assert "Traceback" not in result.stderr and not (tmp_path / "not-a-store").exists()
    store = f"sqlite:///{tmp_path}/mlflow.db"
    result = run("--params", str(ROOT / "params.yaml"), "--tracking-uri", store, "models", "list", cwd=tmp_path,
                 env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/missing/dir/mlflow.db"})
    assert result.returncode == 0 and "no registered models yet" in result.stdout, result.stderr
