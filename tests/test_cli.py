import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from metaflowlib.cli import main

from conftest import ROOT, register_evaluated


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


PREDICTED = "toy-rgb-protonet"


def save_png(path, array, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def tinted(colour, size, seed):
    """An RGB photograph-like image: a tint plus noise."""
    noise = np.random.default_rng(seed).integers(0, 40, (*size, 3))
    return np.clip(np.array(colour) * 0.8 + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path, mlflow_store):
    """A registered RGB ProtoNet in production; support/{apple,sky} (sizes, modes and RGBA mixed) and query/ images."""
    import mlflow
    import torch

    from metaflowlib import registry
    from metaflowlib.artifacts import save_meta_knowledge
    from metaflowlib.data.preprocess import ImageFormat
    from metaflowlib.methods import ProtoNet
    from metaflowlib.serving.fewshot import log_pyfunc_model

    fmt = ImageFormat(channels=3, image_size=28, ink_on_paper=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(0)
    omega = save_meta_knowledge(ProtoNet(in_channels=3, hidden=8), tmp_path / "omega", {"image_size": 28, "image_format": fmt.to_dict()})
    with mlflow.start_run():
        uri = log_pyfunc_model(omega)
    registry.promote(PREDICTED, register_evaluated(uri, PREDICTED, 0.9), "acc_5w1s")
    red, blue = (230, 30, 30), (30, 30, 230)
    save_png(tmp_path / "support" / "apple" / "1.png", tinted(red, (40, 30), 0))
    rgba = np.dstack([tinted(red, (28, 28), 1), np.full((28, 28), 255, np.uint8)])
    save_png(tmp_path / "support" / "apple" / "2.png", rgba, "RGBA")
    save_png(tmp_path / "support" / "sky" / "1.jpg", tinted(blue, (50, 64), 2))
    save_png(tmp_path / "support" / "sky" / "2.png", tinted(blue, (28, 28), 3))
    save_png(tmp_path / "query" / "a.png", tinted(blue, (33, 33), 4))
    save_png(tmp_path / "query" / "more" / "b.png", tinted(red, (20, 45), 5))
    return tmp_path


def test_predict_labels_query_folders_as_text_and_json(folders, capsys):
    params = str(ROOT / "params.yaml")
    main(["--params", params, "predict", PREDICTED, "--support", str(folders / "support"), "--query", str(folders / "query")])
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(file, name) for file, name, _ in lines] == [(str(folders / "query" / "a.png"), "sky"),
                                                         (str(folders / "query" / "more" / "b.png"), "apple")]
    assert all(0.5 <= float(p) <= 1 for _, _, p in lines)

    main(["--params", params, "predict", PREDICTED, "@production", "--support", str(folders / "support"),
          "--query", str(folders / "query"), "--strategy", "tent", "--json"])
    answers = json.loads(capsys.readouterr().out)
    assert [a["class"] for a in answers] == ["sky", "apple"] and list(answers[0]["probabilities"]) == ["apple", "sky"]
    assert all(a["probability"] == max(a["probabilities"].values()) for a in answers)

    from metaflowlib import api

    learner = api.load_version(PREDICTED, 1)
    assert learner.predict_folders(folders / "support", folders / "query", strategy="tent") == answers  # the CLI is the API


@pytest.mark.parametrize("change,message", [
    (lambda root: None, "error: support folder {root}/missing does not exist"),
    (lambda root: (root / "support" / "pear").mkdir(), "error: class folder {root}/support/pear has no images"),
    (lambda root: shutil.rmtree(root / "support" / "sky"),
     "error: support folder {root}/support needs one subfolder per class, at least 2; found only 'apple'"),
    (lambda root: (root / "support" / "sky" / "3.png").write_bytes(b"not a png"), "error: {root}/support/sky/3.png is not a readable image"),
    (lambda root: shutil.rmtree(root / "query"), "error: query folder {root}/query does not exist"),
    (lambda root: [p.unlink() for p in (root / "query").rglob("*.png")], "error: query folder {root}/query has no images"),
    (lambda root: None, "error: unknown strategy 'ttt'; known: source, bn, tent"),
], ids=["missing-support", "empty-class", "one-class", "unreadable-image", "missing-query", "no-query-images", "unknown-strategy"])
def test_a_bad_folder_is_one_line_naming_it(folders, capsys, change, message):
    change(folders)
    support = folders / ("missing" if "missing does not" in message else "support")
    extra = ["--strategy", "ttt"] if "ttt" in message else []
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(ROOT / "params.yaml"), "predict", PREDICTED, "1", "--support", str(support),
              "--query", str(folders / "query"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith(message.format(root=folders)), err
    assert not any("Traceback" in line for line in err)
