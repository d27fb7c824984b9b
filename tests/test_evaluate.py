import math

import pytest
import torch

from metaflowlib.evaluate import confidence_interval, evaluate_protocol
from metaflowlib.methods import ProtoNet


def test_confidence_interval_is_1_96_sample_std_over_sqrt_n():
    # mean 0.7; deviations -0.3, 0.1, 0.1, 0.1 square to 0.12 in all; sample variance 0.12 / 3 = 0.04, std 0.2;
    # half-width 1.96 * 0.2 / sqrt(4) = 0.196 (population std would give 0.170, Student t with 3 df 0.318)
    mean, half = confidence_interval(torch.tensor([0.4, 0.8, 0.8, 0.8]))
    assert math.isclose(mean, 0.7, rel_tol=1e-6) and math.isclose(half, 0.196, rel_tol=1e-6)
    assert confidence_interval(torch.tensor([0.6])) == pytest.approx((0.6, 0.0))  # one task: no spread to estimate


def test_protocol_reports_every_setting_curve_and_timing(tiny_pool):
    method = ProtoNet(hidden=8)
    report = evaluate_protocol(method, tiny_pool, {"5w1s": (5, 1), "3w2s": (3, 2)}, episodes=20, queries=15, seed=0,
                               shots_curve=(1, 5, 10), timing_tasks=3)
    assert set(report["settings"]) == {"5w1s", "3w2s"}
    # 10 examples per class: queries are capped so shots + queries fit, 10-shot leaves none and is skipped
    assert report["settings"]["5w1s"]["queries"] == 9
    assert set(report["shots_curve"]) == {"1", "5"}
    assert report["adaptation_seconds_per_task"] > 0


def test_fixed_head_methods_are_scored_on_their_own_ways_only(tiny_pool):
    from metaflowlib.methods import build_method

    method = build_method("fomaml", ways=3, hidden=4, inner_steps_eval=1)
    report = evaluate_protocol(method, tiny_pool, {"5w1s": (5, 1), "3w1s": (3, 1)}, episodes=4, queries=2, seed=0,
                               shots_curve=(1, 2), timing_tasks=2)
    assert set(report["settings"]) == {"3w1s"} and report["skipped_settings"] == ["5w1s"]
    assert report["shots_curve"]["1"] == report["settings"]["3w1s"]  # reused, not re-run
    assert report["shots_curve"]["2"]["ways"] == 3
