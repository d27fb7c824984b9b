import math

import torch

from metaflowlib.evaluate import confidence_interval, evaluate_protocol
from metaflowlib.methods import ProtoNet


def test_confidence_interval_formula():
    accuracies = torch.tensor([0.5, 0.7, 0.9, 1.0])
    mean, half = confidence_interval(accuracies)
    assert math.isclose(mean, 0.775, rel_tol=1e-6)
    assert math.isclose(half, 1.96 * float(accuracies.std()) / 2, rel_tol=1e-6)


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
