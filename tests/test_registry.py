import mlflow
import numpy as np
import pytest

from metaflowlib import registry
from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.cli import main as cli
from metaflowlib.errors import RegistryError
from metaflowlib.io import file_lock
from metaflowlib.methods import ProtoNet
from metaflowlib.serving.fewshot import log_pyfunc_model

from conftest import ROOT, register_evaluated

NAME = "toy-protonet"


def new_version(tmp_path, acc: float | list[float] | None, protocol: str = "toy", **evaluation) -> str:
    """A version of NAME from a fresh tiny ProtoNet, evaluated as evaluate@ and register@ do (`register_evaluated`
    with `acc` and `evaluation`: its per-task accuracies or their mean); acc None: registered never evaluated."""
    omega = save_meta_knowledge(ProtoNet(hidden=4), tmp_path / f"omega{len(list(tmp_path.glob('omega*')))}", {"image_size": 28})
    with mlflow.start_run():
        uri = log_pyfunc_model(omega)
    if acc is None:
        return registry.register(uri, NAME, {"protocol": protocol}, "not evaluated", "toy").version
    return register_evaluated(uri, NAME, acc, protocol=protocol, **evaluation)


def test_gate_force_rollback_and_production_loading(tmp_path, mlflow_store, capsys):
    v1 = new_version(tmp_path, 0.90)
    with pytest.raises(RegistryError, match="no 'production' version; promote one with"):
        registry.load_production(NAME)
    assert "to production" in registry.promote(NAME, v1, "acc_5w1s")

    v2 = new_version(tmp_path, 0.85)  # 0.05 below v1 on every one of the same tasks
    with pytest.raises(RegistryError, match=r"refusing to promote toy-protonet v2: acc_5w1s 0.8500 vs production v1's 0.9000: "
                       r"difference -0.0500, 95% interval \[-0.0500, -0.0500\] \(paired bootstrap over 100 shared tasks\) "
                       r"\(use --force"):
        registry.promote(NAME, v2, "acc_5w1s")
    assert registry.get_alias(NAME).version == v1

    v3 = new_version(tmp_path, 0.95)
    message = registry.promote(NAME, v3, "acc_5w1s")
    assert message.startswith("promoted toy-protonet v3 to production; acc_5w1s 0.9500 vs production v1's 0.9000: "
                              "difference +0.0500, 95% interval [+0.0"), message
    assert "(forced)" in registry.promote(NAME, v2, "acc_5w1s", force=True)
    assert registry.rollback(NAME) == "rolled toy-protonet production back from v2 to v3"
    assert registry.rollback(NAME) == "rolled toy-protonet production back from v3 to v1"
    with pytest.raises(RegistryError, match="no previous production"):
        registry.rollback(NAME)

    model = registry.load_production(NAME)
    images = np.full((4, 28, 28), 255, np.uint8)
    images[0, :10] = images[2, :10] = 0
    out = model.predict({"support_images": images[:2], "support_labels": np.array([0, 1]), "query_images": images[2:]})
    assert out["labels"].tolist() == [0, 1]

    v4 = new_version(tmp_path, 0.99, protocol="other")
    with pytest.raises(RegistryError, match="protocol 'other' differs"):
        registry.promote(NAME, v4, "acc_5w1s")


def test_unknown_model_version_and_broken_artifacts(tmp_path, mlflow_store):
    with pytest.raises(RegistryError, match="no registered model named 'ghost'"):
        registry.get_version("ghost", 1)
    v1 = new_version(tmp_path, 0.5)
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.promote(NAME, 7, "acc_5w1s")
    # a version whose weights are not loadable never becomes production
    source = mlflow.MlflowClient().get_model_version(NAME, v1).source
    local = mlflow.artifacts.download_artifacts(source)
    for weights in __import__("pathlib").Path(local).rglob("model.safetensors"):
        weights.write_bytes(b"not safetensors")
    store_root = tmp_path / "mlruns"
    for weights in store_root.rglob("model.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(RegistryError, match="failed its load check, production not moved"):
        registry.promote(NAME, v1, "acc_5w1s")
    assert registry.get_alias(NAME) is None


def test_cli_promote_refusal_is_one_line_and_exit_2(tmp_path, mlflow_store, capsys):
    v1 = new_version(tmp_path, 0.9)
    v2 = new_version(tmp_path, 0.8)
    params = str(ROOT / "params.yaml")
    cli(["--params", params, "promote", NAME, v1])
    with pytest.raises(SystemExit) as exit_info:
        cli(["--params", params, "promote", NAME, v2])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: refusing to promote toy-protonet v2: acc_5w1s 0.8000 vs production v1's 0.9000: "
                          "difference -0.1000") and err.endswith("(use --force to override)") and "Traceback" not in err
    cli(["--params", params, "models", "list"])
    out = capsys.readouterr().out
    assert "v1 [production]  acc_5w1s 0.9000" in out and "v2  acc_5w1s 0.8000" in out


def test_unknown_name_alias_and_deleted_version_are_one_line_errors(tmp_path, mlflow_store, capsys):
    v1, v2 = new_version(tmp_path, 0.9), new_version(tmp_path, 0.8)
    registry.promote(NAME, v1, "acc_5w1s")
    registry.promote(NAME, v2, "acc_5w1s", force=True)  # production v2, history [v1]
    mlflow.MlflowClient().delete_model_version(NAME, v1)
    params = str(ROOT / "params.yaml")
    cases = [
        (["models", "show", "ghost"], "error: no registered model named 'ghost'"),
        (["promote", "ghost", "1"], "error: no registered model named 'ghost'"),
        (["rollback", "ghost"], "error: no registered model named 'ghost'"),
        (["models", "show", NAME, "@champion"], "error: registered model 'toy-protonet' has no alias 'champion' (aliases: ['production'])"),
        (["promote", NAME, "@champion"], "error: registered model 'toy-protonet' has no alias 'champion'"),
        (["models", "show", NAME, "1"], "error: registered model 'toy-protonet' has no version 1 (never registered, or deleted; versions: [2])"),
        (["promote", NAME, "1", "--force"], "error: registered model 'toy-protonet' has no version 1"),
        (["promote", NAME, "latest"], "error: registered model 'toy-protonet' has no version latest"),
        (["rollback", NAME], "error: cannot roll toy-protonet back to v1, the version production replaced: registered model"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli(["--params", params, *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, args
        assert err.strip().splitlines()[-1].startswith(message), (args, err)
    assert registry.get_alias(NAME).version == v2  # nothing moved
    cli(["--params", params, "models", "show", NAME, "@production"])  # an alias that exists is a valid reference
    assert capsys.readouterr().out.startswith("toy-protonet v2 aliases=['production']")
    mlflow.MlflowClient().delete_model_version(NAME, v2)  # deleting production takes the alias with it
    with pytest.raises(SystemExit):
        cli(["--params", params, "models", "show", NAME])
    assert "has no production version; pass a version number" in capsys.readouterr().err


def test_the_gate_holds_without_a_metric_a_lock_or_a_stable_production(tmp_path, mlflow_store, monkeypatch):
    v1, v2, v3 = new_version(tmp_path, 0.5), new_version(tmp_path, None), new_version(tmp_path, 0.7)
    registry.promote(NAME, v1, "acc_5w1s")
    run_id = registry.get_version(NAME, v2).run_id
    with pytest.raises(RegistryError, match=f"refusing to promote toy-protonet v2: v2's run {run_id} records no acc_5w1s, so there is nothing to compare \\(use --force"):
        registry.promote(NAME, v2, "acc_5w1s")  # not evaluated: no way past the gate without --force
    mlflow.MlflowClient().set_model_version_tag(NAME, v2, "acc_5w1s", "0.99")  # a tag is not an evaluation
    with pytest.raises(RegistryError, match=f"v2's run {run_id} records no acc_5w1s"):
        registry.promote(NAME, v2, "acc_5w1s")
    assert registry.get_alias(NAME).version == v1

    lock = tmp_path / "mlflow.db.registry.lock"
    monkeypatch.setattr(registry, "LOCK_SECONDS", 0.2)
    with file_lock(lock, 1), pytest.raises(RegistryError, match=r"another promote or rollback has held .*registry.lock"):
        registry.promote(NAME, v3, "acc_5w1s")  # a stuck holder: refused after the wait, never a hang

    def another_writer(name, version):  # what a promote on a store without the lock could do meanwhile
        mlflow.MlflowClient().set_registered_model_alias(NAME, registry.ALIAS, v2)

    monkeypatch.setattr(registry, "smoke_test", another_writer)
    with pytest.raises(RegistryError, match="production moved to v2 while this command ran; production not moved"):
        registry.promote(NAME, v3, "acc_5w1s")
    assert registry.get_alias(NAME).version == v2 and registry._history(NAME) == []
