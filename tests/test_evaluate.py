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
