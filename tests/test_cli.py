import subprocess
import sys

from conftest import ROOT


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "metaflowlib.cli", *args], capture_output=True, text=True, cwd=cwd)


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
