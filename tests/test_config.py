import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaflowlib.config import load_params, parse_params
from metaflowlib.config.check import check_params
from metaflowlib.config.methods import method_spec
from metaflowlib.errors import ConfigError

from conftest import ROOT

SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value):
    data = copy.deepcopy(SHIPPED)
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[leaf] = value
    return data


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.methods["protonet"].kind == "protonet" and params.methods["maml"].kind == "maml"
    assert params.settings() == {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
    assert method_spec(params, "protonet").budget_in("default").episodes == 2500  # episodes in every profile; seconds only cap a slow machine
    assert params.registered_name("protonet") == "omniglot-vinyals-protonet"


@pytest.mark.parametrize("path,value,message", [
    ("data.protocl", "vinyals", "data.protocl: Extra inputs are not permitted"),
    ("methods.protonet.meta_optimizer.lr", -0.1, "methods.protonet.meta_optimizer.lr: Input should be greater than 0 (got -0.1)"),
    ("methods.protonet.ways", "sixty", "methods.protonet.ways: Input should be a valid integer"),
    ("methods.protonet.kind", "protonut", "methods.protonet.kind: unknown method 'protonut'; known: fomaml, imaml, maml, param_prediction, protonet, reptile"),
    ("methods.protonet.ways", 5000, "methods.protonet: 5000 ways exceed the 4112 classes of the vinyals train split"),
    ("methods.protonet.queries", 16, "methods.protonet: shots + queries = 21 exceeds the 20 examples per Omniglot class"),
    ("evaluate.settings", ["5w1s", "five"], "evaluate.settings.1: String should match pattern"),
    ("profile", "huge", "profile: Input should be 'default' or 'full'"),
    ("registry.gate_metric", "loss", "registry.gate_metric"),
])
def test_bad_values_name_field_and_value(path, value, message):
    with pytest.raises(ConfigError) as error:
        check_params(with_change(path, value))
    assert message in str(error.value)


def test_all_errors_are_reported_at_once():
    data = with_change("seed", "x")
    data["train"]["val_every"] = 0
    with pytest.raises(ConfigError, match="2 invalid value") as error:
        parse_params(data)
    assert "seed" in str(error.value) and "train.val_every" in str(error.value)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("methods: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_params(tmp_path / "list.yaml")


LEAVES = ["seed", "profile", "device", "data.image_size", "methods.protonet.ways", "methods.protonet.shots",
          "methods.protonet.meta_optimizer.lr", "train.val_every", "evaluate.tasks", "evaluate.queries"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(LEAVES), value=st.one_of(st.text(max_size=5), st.floats(allow_nan=True), st.integers(-10**6, -1), st.none(), st.lists(st.integers(), max_size=2)))
def test_random_wrong_values_fail_cleanly(path, value):
    """Every value either validates or raises ConfigError naming the field: never another exception."""
    try:
        check_params(with_change(path, value))
    except ConfigError as error:
        assert path.split(".")[-1] in str(error) or "methods.protonet" in str(error)


@settings(max_examples=40, deadline=None)
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_top_level_keys_are_refused(key):
    if key in SHIPPED:
        return
    data = copy.deepcopy(SHIPPED)
    data[key] = 1
    with pytest.raises(ConfigError, match=f"{key}: Extra inputs are not permitted"):
        parse_params(data)


def test_maml_family_blocks_build_their_methods():
    data = copy.deepcopy(SHIPPED)
    data["methods"] = {"m": {"kind": "fomaml"}, "r": {"kind": "reptile"}, "i": {"kind": "imaml", "lam": 0.5}}
    data["shift"]["methods"] = ["m"]
    data["optimizer"]["finetune"]["methods"] = ["m"]
    _, specs = check_params(data)
    built = {k: spec.build(28) for k, spec in specs.items()}
    assert built["m"].first_order and built["i"].config()["lam"] == 0.5
    assert specs["r"].meta_optimizer.name == "sgd" and specs["r"].meta_optimizer.lr == 1.0
    data["methods"]["r"]["meta_optimizer"] = {"name": "adam"}
    with pytest.raises(ConfigError, match="methods.r: reptile's outer update .* must be 'sgd'"):
        check_params(data)


def test_shift_names_methods_that_exist():
    data = copy.deepcopy(SHIPPED)
    data["shift"]["methods"] = ["protonet", "nope"]
    with pytest.raises(ConfigError, match=r"shift.methods \['nope'\] are not keys of methods"):
        check_params(data)
    data["shift"].update(methods=["protonet"], queries=19, setting="5w5s")
    with pytest.raises(ConfigError, match="shift.setting: shots \\+ queries = 24 exceeds the 20 examples per Omniglot class"):
        check_params(data)


def test_a_method_block_may_validate_on_its_own_cadence() -> None:
    p = parse_params({"methods": {"imaml": {"kind": "imaml", "val_every": 25}, "maml": {"kind": "maml"}},
                      "train": {"val_every": 200}})
    assert method_spec(p, "imaml").val_every == 25 and method_spec(p, "maml").val_every is None
    with pytest.raises(ConfigError, match="val_every"):
        parse_params({"methods": {"imaml": {"kind": "imaml", "val_every": 0}}})


def test_a_method_block_takes_its_class_defaults_and_arguments() -> None:
    """Shared fields a block leaves out come from the method class (its paper's settings), a profile's budget it
    leaves out too; any other key must be an argument of the class, typed by its signature."""
    p = parse_params({"methods": {"m": {"kind": "maml", "budget": {"default": {"episodes": 7}}, "inner_lr": "0.1"},
                                  "r": {"kind": "reptile"}}})
    maml, reptile = method_spec(p, "m"), method_spec(p, "r")
    assert (maml.ways, maml.tasks_per_step, maml.budget_in("default").count, maml.budget_in("full").count) == (5, 32, 7, 60000)
    assert (maml.options["inner_lr"], maml.options["inner_steps"]) == (0.1, 1) and maml.build(28).inner_lr == 0.1
    assert (reptile.shots, reptile.meta_optimizer.name, reptile.meta_optimizer.schedule) == (5, "sgd", "linear")
    bad = parse_params({"methods": {"m": {"kind": "maml", "inner_lr": "fast", "lam": 1.0, "image_size": 84}}})
    with pytest.raises(ConfigError) as error:
        method_spec(bad, "m")
    lines = str(error.value).splitlines()
    assert lines[0] == "params: 3 invalid value(s)"
    assert "  methods.m.inner_lr: Input should be a valid number, unable to parse string as a number (got 'fast')" in lines
    assert any(line.startswith("  methods.m.lam: not an argument of MAML (it takes ") and "inner_lr" in line for line in lines)
    assert "  methods.m.image_size: set by the data section, not by a method block" in lines
    with pytest.raises(ConfigError, match="methods.m: inner_lr .alpha. must be > 0, got -1.0"):
        method_spec(parse_params({"methods": {"m": {"kind": "maml", "inner_lr": -1.0}}}), "m")


def test_experiment_sections_are_loaded_by_the_stages_that_read_them() -> None:
    from metaflowlib.config.tta import TTAParams

    p = parse_params(SHIPPED)
    with pytest.raises(ConfigError, match="params section 'tta' was not loaded"):
        p.tta.strategies
    assert "tent" in parse_params(SHIPPED, tta=TTAParams).tta.strategies
    with pytest.raises(ConfigError, match=r"tta.strategies.x: Input tag 'nope' found using 'kind' does not match any of the expected tags: 'source', 'bn', 'tent', 'ttt'"):
        parse_params({**SHIPPED, "tta": {"strategies": {"x": {"kind": "nope"}}}}, tta=TTAParams)


def test_params_load_without_torch_or_any_registry() -> None:
    """The shared sections name no method, strategy or optimizee: loading them imports none of that code (each
    experiment section imports its own registry, and only the stages that read it load it)."""
    import subprocess
    import sys

    code = ("import sys; from metaflowlib.config import load_params; load_params('params.yaml'); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('metaflowlib.methods', 'metaflowlib.tta', 'metaflowlib.learned'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
