"""`precision: auto` / `channels_last: auto` (metaflowlib.precision, issue #16): chosen by timing on a CPU, cached per
machine, obeyed when explicit, kept by a resumed run. The chooser's tests inject the timing (no timing assertions)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import load_stage
from metaflowlib import precision
from metaflowlib.episodes import TaskPool
from metaflowlib.methods import build_method
from metaflowlib.precision import Choice, Probe, choose, label, meta_step_probe, probe_episode, recorded

CPU = torch.device("cpu")


def probe(**key) -> Probe:
    def make(candidate):
        raise AssertionError("an injected timer never builds a step")

    return Probe(make, {"kind": "test", **key})


class Timer:
    """Rates by candidate label; records which candidates each call was asked to time."""

    def __init__(self, **rates: float) -> None:
        self.rates = {name.replace("__", "/"): rate for name, rate in rates.items()}
        self.calls: list[list[str]] = []

    def __call__(self, probe: Probe, candidates) -> dict[str, float]:
        self.calls.append([label(c) for c in candidates])
        return {label(c): self.rates[label(c)] for c in candidates}


RATES = {"fp32__nchw": 10.0, "fp32__channels_last": 14.0, "bf16__nchw": 12.0, "bf16__channels_last": 30.0}


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "precision.json"


def test_bf16_clearly_faster_is_chosen(cache):
    choice = choose("auto", "auto", CPU, probe(), timer=Timer(**RATES), bf16_units=True, cache=cache)
    assert (choice.precision, choice.channels_last, choice.source) == ("bf16", True, "measured")
    assert choice.dtype is torch.bfloat16 and choice.rates["bf16/channels_last"] == 30.0


def test_bf16_within_the_margin_keeps_fp32(cache):
    timer = Timer(**{**RATES, "bf16__channels_last": 15.0})  # 7% over fp32/channels_last: noise, not a win
    choice = choose("auto", "auto", CPU, probe(), timer=timer, bf16_units=True, cache=cache)
    assert (choice.precision, choice.channels_last) == ("fp32", True)
    assert choice.dtype is None


def test_a_layout_within_the_margin_keeps_nchw(cache):
    timer = Timer(fp32__nchw=10.0, fp32__channels_last=10.5)
    assert choose("fp32", "auto", CPU, probe(), timer=timer, cache=cache).channels_last is False
    assert timer.calls == [["fp32/nchw", "fp32/channels_last"]]  # explicit fp32: bf16 never timed


def test_without_bf16_units_bf16_is_never_timed(cache):
    timer = Timer(**RATES)
    choice = choose("auto", "auto", CPU, probe(), timer=timer, bf16_units=False, cache=cache)
    assert choice.precision == "fp32"
    assert timer.calls == [["fp32/nchw", "fp32/channels_last"]]


def test_a_method_that_is_always_fp32_times_layouts_only(cache):
    timer = Timer(**RATES)
    choice = choose("auto", "auto", CPU, Probe(probe().make, {"kind": "test"}, bf16=False), timer=timer, bf16_units=True, cache=cache)
    assert choice.precision == "fp32" and timer.calls == [["fp32/nchw", "fp32/channels_last"]]
    single = choose("auto", "auto", CPU, Probe(probe().make, {"kind": "other"}, bf16=False, layouts=False), timer=timer,
                    bf16_units=True, cache=cache)
    assert (single.precision, single.channels_last, single.source) == ("fp32", False, "single") and len(timer.calls) == 1


def test_explicit_values_are_obeyed_without_timing(cache):
    def never(probe, candidates):
        raise AssertionError("explicit values are not measured")

    assert choose("fp32", True, CPU, timer=never, cache=cache) == Choice("fp32", True, "explicit")
    assert choose("bf16", False, CPU, timer=never, bf16_units=False, cache=cache) == Choice("bf16", False, "explicit")
    assert not cache.exists()
    with pytest.raises(ValueError, match="precision must be one of"):
        choose("fp16", True, CPU)
    with pytest.raises(ValueError, match="channels_last must be"):
        choose("fp32", "yes", CPU)


def test_cuda_keeps_the_fixed_rule(cache, monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)

    def never(probe, candidates):
        raise AssertionError("a GPU is not measured")

    assert choose("auto", "auto", torch.device("cuda"), timer=never, cache=cache) == Choice("bf16", True, "cuda")
    assert choose("fp32", "auto", torch.device("cuda"), timer=never, cache=cache) == Choice("fp32", True, "cuda")


def test_the_second_call_reads_the_cache(cache):
    timer = Timer(**RATES)
    first = choose("auto", "auto", CPU, probe(), timer=timer, bf16_units=True, cache=cache)
    second = choose("auto", "auto", CPU, probe(), timer=timer, bf16_units=True, cache=cache)
    assert len(timer.calls) == 1
    assert second.source == "cached" and (second.precision, second.channels_last, second.rates) == (first.precision, first.channels_last, first.rates)
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["key"]["cpu"] and entry["key"]["torch"] == torch.__version__ and entry["key"]["threads"] == torch.get_num_threads()


def test_another_key_measures_again(cache, monkeypatch):
    timer = Timer(**RATES)
    choose("auto", "auto", CPU, probe(shape=[1, 5]), timer=timer, bf16_units=True, cache=cache)
    choose("auto", "auto", CPU, probe(shape=[1, 300]), timer=timer, bf16_units=True, cache=cache)  # another episode shape
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        choose("auto", "auto", CPU, probe(shape=[1, 5]), timer=timer, bf16_units=True, cache=cache)  # another thread count
    finally:
        torch.set_num_threads(threads)
    assert len(timer.calls) == 3 and len(json.loads(cache.read_text())) == 3


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", "", "entry"])
def test_a_damaged_cache_is_measured_again(cache, damage):
    timer = Timer(**RATES)
    if damage == "entry":  # valid JSON, a broken entry under the right key
        choose("auto", "auto", CPU, probe(), timer=timer, bf16_units=True, cache=cache)
        cache.write_text(json.dumps({k: {"precision": "fp8"} for k in json.loads(cache.read_text())}))
        timer.calls.clear()
    else:
        cache.write_text(damage)
    choice = choose("auto", "auto", CPU, probe(), timer=timer, bf16_units=True, cache=cache)
    assert choice.source == "measured" and len(timer.calls) == 1
    assert choose("auto", "auto", CPU, probe(), timer=timer, bf16_units=True, cache=cache).source == "cached"


def test_the_cache_lives_where_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLOWLIB_CACHE_DIR", str(tmp_path / "here"))
    choose("auto", "auto", CPU, probe(), timer=Timer(**RATES), bf16_units=True)
    assert (tmp_path / "here" / "precision.json").is_file()
    monkeypatch.delenv("METAFLOWLIB_CACHE_DIR")
    assert precision.cache_path() == precision.Path.home() / ".cache" / "metaflowlib" / "precision.json"


def test_timing_the_real_step_leaves_the_run_untouched(cache, tiny_pool):
    """The default timer runs real steps, on copies: the method's weights and mode and the global random states
    (which seed the run's results) are as before."""
    torch.manual_seed(0)
    method = build_method("protonet", hidden=4).eval()
    weights = {k: v.clone() for k, v in method.state_dict().items()}
    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    episode = probe_episode(method, tiny_pool, 3, 1, 2)
    choice = choose("auto", "auto", CPU, meta_step_probe(method, episode), bf16_units=True, cache=cache)
    assert choice.source == "measured" and set(choice.rates) == {"fp32/nchw", "fp32/channels_last", "bf16/nchw", "bf16/channels_last"}
    assert all(rate > 0 for rate in choice.rates.values())
    assert not method.training and all(torch.equal(weights[k], v) for k, v in method.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), states[0]) and (np.random.get_state()[1] == states[1]).all()
    assert random.getstate() == states[2]


def test_a_frozen_feature_map_is_timed_on_embedded_episodes(tiny_pool):
    method = build_method("param_prediction", hidden=4, predictor_hidden=8)
    episode = probe_episode(method, tiny_pool, 3, 1, 2)
    probe = meta_step_probe(method, episode)
    assert episode.embedded and episode.support_x.dim() == 3 and not probe.layouts
    probe.make(("fp32", False))()  # the step runs on the embedded episode


def test_the_choice_is_recorded_and_read_back(tmp_path):
    choice = Choice("bf16", True, "measured", {"fp32/nchw": 10.0, "bf16/channels_last": 30.0})
    record = json.loads(json.dumps(choice.to_json()))  # as train.json stores it
    assert Choice.from_json(record, "recorded") == Choice("bf16", True, "recorded", choice.rates)
    assert choice.tags() == {"precision": "bf16", "channels_last": "true", "precision_source": "measured",
                             "precision_rates": "fp32/nchw 10, bf16/channels_last 30"}
    assert "bf16/channels_last (measured: " in choice.describe()
    # evaluate@ follows train@'s record, measuring nothing; without a record, auto is fp32 on a CPU
    assert recorded(record, "auto", "auto", CPU) == Choice("bf16", True, "recorded", choice.rates)
    assert recorded(None, "auto", "auto", CPU) == Choice("fp32", False, "default")
    assert recorded(None, "bf16", True, CPU) == Choice("bf16", True, "explicit")
    with pytest.raises(ValueError, match="not a precision choice"):
        Choice.from_json({"precision": "fp16", "channels_last": True})


def test_a_resumed_run_keeps_the_choice_its_checkpoint_kept(tmp_path):
    checkpoints = load_stage("train").Checkpoints  # pipelines/_stage.py, as the stages import it
    first = checkpoints.of(tmp_path, "m", {"train": {"precision": "auto"}})
    assert first.kept("precision") is None
    first.started("run-1", precision=Choice("bf16", True, "measured").to_json())
    again = checkpoints.of(tmp_path, "m", {"train": {"precision": "auto"}})
    assert Choice.from_json(again.kept("precision"), "resumed") == Choice("bf16", True, "resumed")
    other = checkpoints.of(tmp_path, "m", {"train": {"precision": "fp32"}})  # other params: a fresh start
    assert other.kept("precision") is None


def test_params_accept_auto_and_booleans_for_channels_last():
    from metaflowlib.config.common import TrainParams

    assert TrainParams().channels_last == "auto" and TrainParams().precision == "auto"
    assert TrainParams(channels_last=True).channels_last is True and TrainParams(channels_last=False).channels_last is False
    with pytest.raises(ValueError):
        TrainParams(channels_last="sometimes")
