"""The promotion gate (metaflowlib.gate, issue 17): a candidate must beat production task by task on the same fixed
tasks, beyond the noise of a finite test set, by the numbers its evaluation run recorded (never its tags).

Versions are made as evaluate@ and register@ make them (conftest.register_evaluated); the legacy ones as they were
before per-task accuracies were kept: no `evaluation_run_id`, the metric in the version's own run.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re

import mlflow
import numpy as np
import pytest
import yaml

from metaflowlib import gate, registry
from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.cli import main as cli
from metaflowlib.errors import RegistryError
from metaflowlib.methods import ProtoNet
from metaflowlib.serving.fewshot import log_pyfunc_model

from conftest import ROOT, TOY_DIGEST, register_evaluated, task_accuracies

NAME = "toy-gate"
METRIC = "acc_5w1s"


@pytest.fixture
def model_uri(tmp_path, mlflow_store) -> str:
    """One tiny logged ProtoNet: the versions below register it, each with an evaluation run of its own."""
    omega = save_meta_knowledge(ProtoNet(hidden=4), tmp_path / "omega", {"image_size": 28})
    with mlflow.start_run():
        return log_pyfunc_model(omega)


def legacy_version(tmp_path, acc: float, tag: float | None = None) -> str:
    """A version registered before issue 17: tagged `tag` (default `acc`), its run logging `acc`, no evaluation run."""
    omega = save_meta_knowledge(ProtoNet(hidden=4), tmp_path / f"legacy{acc}", {"image_size": 28})
    with mlflow.start_run():
        mlflow.log_metric(METRIC, acc)
        uri = log_pyfunc_model(omega)
    tags = {METRIC: acc if tag is None else tag, "protocol": "toy"}
    return registry.register(uri, NAME, tags, "legacy", "toy").version


def plus_minus(spread: float, tasks: int, seed: int) -> np.ndarray:
    """`spread` on half the tasks and -`spread` on the other half, in an order fixed by `seed`: mean 0, sd `spread`."""
    return np.random.default_rng(seed).permutation(np.repeat([spread, -spread], tasks // 2))


def exact_quantile(sorted_means: np.ndarray, p: float) -> float:
    """The p-quantile of equally likely `sorted_means`: the smallest one with at least a fraction p at or below it."""
    return float(sorted_means[max(0, math.ceil(p * len(sorted_means)) - 1)])


INTERVAL = r"(\d{2}(?:\.\d+)?)% interval \[([-+]\d\.\d{4}), ([-+]\d\.\d{4})\]"


# -- the paired bootstrap itself ------------------------------------------------------------------------------------


def test_constant_differences_give_a_zero_width_interval_at_that_constant():
    for tasks in (1, 7, 200):
        mean, low, high = gate.paired_bootstrap(np.full(tasks, 0.03), 0.95)
        assert (mean, low, high) == pytest.approx((0.03, 0.03, 0.03), abs=1e-12), tasks


def test_the_interval_is_the_percentile_interval_of_all_n_to_the_n_resamples():
    """n = 4 tasks: 4^4 = 256 equally likely resamples, enumerated. With B = 10,000 resamples the fraction below the
    bootstrap's endpoint is within 4 standard errors, 4 * sqrt(t(1 - t) / B) (< 0.009 for any tail t), of the tail t,
    so the endpoint lies between the exact quantiles at t -/+ that slack (about 2 atoms apart here; a one-sided or
    other-confidence interval lands several atoms away)."""
    differences = np.array([-0.30, 0.05, 0.10, 0.40])
    means = np.sort([differences[list(i)].mean() for i in itertools.product(range(4), repeat=4)])
    for confidence in (0.8, 0.95):
        mean, low, high = gate.paired_bootstrap(differences, confidence)
        assert mean == pytest.approx(0.0625, abs=1e-12)
        tail = (1 - confidence) / 2
        slack = 4 * math.sqrt(tail * (1 - tail) / gate.BOOTSTRAP_SAMPLES) + 1 / gate.BOOTSTRAP_SAMPLES
        for endpoint, p in ((low, tail), (high, 1 - tail)):
            assert exact_quantile(means, p - slack) - 1e-12 <= endpoint <= exact_quantile(means, p + slack) + 1e-12, (confidence, p)
    assert gate.paired_bootstrap(differences, 0.95)[1:] == pytest.approx((-0.2, 0.3125), abs=1e-12)  # worked out from the enumeration


def test_the_interval_agrees_with_scipys_percentile_bootstrap():
    """Two independent 10,000-resample estimates of each endpoint: each has a Monte Carlo sd of about
    sqrt(t(1 - t) / B) / density ~ 0.027 standard errors of the mean, their difference about 0.04; allowed: 0.15."""
    from scipy.stats import bootstrap

    differences = np.random.default_rng(7).normal(0.02, 0.1, 40)
    se = differences.std(ddof=1) / math.sqrt(len(differences))
    mean, low, high = gate.paired_bootstrap(differences, 0.95)
    reference = bootstrap((differences,), np.mean, n_resamples=gate.BOOTSTRAP_SAMPLES, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(1)).confidence_interval
    assert mean == pytest.approx(differences.mean(), abs=1e-12)
    assert low == pytest.approx(reference.low, abs=0.15 * se) and high == pytest.approx(reference.high, abs=0.15 * se)


# -- promote: numbers from the evaluation runs ------------------------------------------------------------------------


def test_a_clear_gain_on_the_same_tasks_is_promoted_stating_both_accuracies_the_difference_and_its_interval(model_uri):
    """+0.03 on tasks whose difficulty varies far more (0.3 vs 0.9): only the pairing shows the gain, +0.03 -/+ 0.007
    (compared unpaired, the tasks' spread would swamp it: about +0.03 -/+ 0.06)."""
    production = np.array(task_accuracies(0.6, 200, 0.3, seed=1))
    candidate = production + 0.03 + plus_minus(0.05, 200, seed=2)
    v1 = register_evaluated(model_uri, NAME, production.tolist())
    registry.promote(NAME, v1, METRIC)
    v2 = register_evaluated(model_uri, NAME, candidate.tolist())
    message = registry.promote(NAME, v2, METRIC)
    found = re.fullmatch(rf"promoted toy-gate v2 to production; acc_5w1s 0\.6300 vs production v1's 0\.6000: difference "
                         rf"\+0\.0300, {INTERVAL} \(paired bootstrap over 200 shared tasks\)", message)
    assert found, message
    se = 0.05 / math.sqrt(200)  # the differences are 0.03 -/+ 0.05, half each
    assert found[1] == "95" and 0 < float(found[2]) < 0.03 < float(found[3])
    # normal approximation 0.03 -/+ 1.96 se = [0.0231, 0.0369]; tolerance 0.2 se = 0.0007 (Monte Carlo sd of an endpoint
    # ~0.03 se, the printed rounding 0.00005); a 90% interval, [0.0242, 0.0358], would be outside it
    assert float(found[2]) == pytest.approx(0.03 - 1.96 * se, abs=0.2 * se)
    assert float(found[3]) == pytest.approx(0.03 + 1.96 * se, abs=0.2 * se)
    assert registry.get_alias(NAME).version == v2 and registry._history(NAME) == [v1]


def test_a_higher_mean_within_noise_is_refused(model_uri):
    """Item 7: +0.002 on average over 200 tasks, with a task-to-task sd of 0.2, is noise, not a better model."""
    production = np.array(task_accuracies(0.5, 200, 0.25, seed=3))
    candidate = production + 0.002 + plus_minus(0.2, 200, seed=4)  # every accuracy stays within [0.05, 0.96]
    v1 = register_evaluated(model_uri, NAME, production.tolist())
    registry.promote(NAME, v1, METRIC)
    v2 = register_evaluated(model_uri, NAME, candidate.tolist())
    with pytest.raises(RegistryError) as refused:
        registry.promote(NAME, v2, METRIC)
    found = re.fullmatch(rf"refusing to promote toy-gate v2: acc_5w1s 0\.5020 vs production v1's 0\.5000: difference "
                         rf"\+0\.0020, {INTERVAL} \(paired bootstrap over 200 shared tasks\) \(use --force to override\)",
                         str(refused.value))
    assert found, refused.value
    assert float(found[2]) < 0 < float(found[3])  # about 0.002 -/+ 1.96 * 0.2 / sqrt(200) = [-0.026, +0.030]
    assert registry.get_alias(NAME).version == v1
    # the point estimates alone (the rule before issue 17) would have promoted it
    point = [gate.Evidence(v, float(a.mean()), None, None, "run") for v, a in ((v2, candidate), (v1, production))]
    assert gate.decide(*point, METRIC, 0.95).better


def test_versions_scored_on_different_tasks_are_not_comparable_unless_forced(model_uri):
    ours, theirs = (hashlib.sha256(text).hexdigest() for text in (b"test tasks, seed 0", b"test tasks, seed 1"))
    v1 = register_evaluated(model_uri, NAME, 0.6, digest=ours)
    registry.promote(NAME, v1, METRIC)
    v2 = register_evaluated(model_uri, NAME, 0.9, digest=theirs)  # far better, on other tasks
    explained = (f"acc_5w1s 0.9000 vs production v1's 0.6000: scored on different tasks (100 with episodes digest "
                 f"{theirs[:12]}, 100 with {ours[:12]}), so not comparable")
    with pytest.raises(RegistryError) as refused:
        registry.promote(NAME, v2, METRIC)
    assert str(refused.value) == f"refusing to promote toy-gate v2: {explained} (use --force to override)"
    assert registry.get_alias(NAME).version == v1
    assert registry.promote(NAME, v2, METRIC, force=True) == f"promoted toy-gate v2 to production (forced); {explained}"
    assert registry.get_alias(NAME).version == v2
    # the same digest over a different number of tasks is not the same tasks either
    short = [gate.Evidence(v, 0.7, np.full(n, 0.7), ours, "run") for v, n in (("3", 99), ("2", 100))]
    assert not gate.decide(*short, METRIC, 0.95).better and "not comparable" in gate.decide(*short, METRIC, 0.95).message


def test_a_legacy_version_falls_back_to_the_point_estimate_read_from_its_run(tmp_path, model_uri):
    rule = ("stored no per-task accuracies (evaluated before they were kept, or not a few-shot setting), so the rule is: "
            "the candidate's point estimate must exceed production's")
    v1 = legacy_version(tmp_path, 0.80)
    registry.promote(NAME, v1, METRIC)
    v2 = register_evaluated(model_uri, NAME, 0.79)
    with pytest.raises(RegistryError) as refused:
        registry.promote(NAME, v2, METRIC)
    assert str(refused.value) == f"refusing to promote toy-gate v2: acc_5w1s 0.7900 vs production v1's 0.8000: v1 {rule} (use --force to override)"
    v3 = register_evaluated(model_uri, NAME, 0.81)  # +0.01: within noise for a paired test, enough for the rule
    assert registry.promote(NAME, v3, METRIC) == f"promoted toy-gate v3 to production; acc_5w1s 0.8100 vs production v1's 0.8000: v1 {rule}"

    v4 = legacy_version(tmp_path, 0.70, tag=0.95)  # the tag claims more than its run recorded: the run counts
    with pytest.raises(RegistryError) as refused:
        registry.promote(NAME, v4, METRIC)
    assert str(refused.value) == f"refusing to promote toy-gate v4: acc_5w1s 0.7000 vs production v3's 0.8100: v4 {rule} (use --force to override)"
    v5 = legacy_version(tmp_path, 0.90)
    assert registry.promote(NAME, v5, METRIC) == f"promoted toy-gate v5 to production; acc_5w1s 0.9000 vs production v3's 0.8100: v5 {rule}"
    assert registry._history(NAME) == [v1, v3]


def test_editing_a_versions_metric_tag_does_not_change_the_decision(model_uri):
    v1 = register_evaluated(model_uri, NAME, 0.90)
    registry.promote(NAME, v1, METRIC)
    v2, v3 = register_evaluated(model_uri, NAME, 0.85), register_evaluated(model_uri, NAME, 0.95)
    client = mlflow.MlflowClient()
    for version, claimed in ((v1, "0.10"), (v2, "0.99"), (v3, "0.01")):
        client.set_model_version_tag(NAME, version, METRIC, claimed)
    with pytest.raises(RegistryError, match=r"refusing to promote toy-gate v2: acc_5w1s 0\.8500 vs production v1's 0\.9000: "
                                            r"difference -0\.0500"):
        registry.promote(NAME, v2, METRIC)
    assert registry.promote(NAME, v3, METRIC).startswith(
        "promoted toy-gate v3 to production; acc_5w1s 0.9500 vs production v1's 0.9000: difference +0.0500, 95% interval [+0.0")


def test_the_confidence_of_the_interval_is_honoured(tmp_path, model_uri, capsys):
    """+0.05 on average over 100 tasks, sd 0.2: the 95% interval (about 0.05 -/+ 0.039) excludes 0, the 99.9% one
    (about 0.05 -/+ 0.066) does not."""
    production = np.array(task_accuracies(0.5, 100, 0.25, seed=5))
    candidate = production + 0.05 + plus_minus(0.2, 100, seed=6)
    v1 = register_evaluated(model_uri, NAME, production.tolist())
    registry.promote(NAME, v1, METRIC)
    v2 = register_evaluated(model_uri, NAME, candidate.tolist())

    with pytest.raises(RegistryError) as refused:
        registry.promote(NAME, v2, METRIC, confidence=0.999)
    found = re.search(INTERVAL, str(refused.value))
    assert found[1] == "99.9" and float(found[2]) < 0 < float(found[3]), refused.value

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["registry"]["confidence"] = 0.999  # the project's setting reaches `metaflowlib promote`
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_info:
        cli(["--params", str(tmp_path / "strict.yaml"), "promote", NAME, v2])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and err.startswith("error: refusing to promote toy-gate v2") and "99.9% interval [-0.0" in err
    assert registry.get_alias(NAME).version == v1

    message = registry.promote(NAME, v2, METRIC, confidence=0.95)
    found = re.search(INTERVAL, message)
    assert message.startswith("promoted toy-gate v2 to production; ") and found[1] == "95" and 0 < float(found[2]) < 0.05, message


def test_the_toy_versions_record_what_the_pipeline_records(model_uri):
    """The fixture itself: the version's tag names a run holding the metric and the per-task artifact it summarizes."""
    accuracies = task_accuracies(0.7, 10, 0.2, seed=0)
    info = registry.get_version(NAME, register_evaluated(model_uri, NAME, accuracies))
    run = mlflow.get_run(info.tags[gate.EVALUATION_RUN_TAG])
    assert run.info.run_name == f"{NAME}-evaluate" and run.data.tags["stage"] == f"evaluate@{NAME}"
    assert run.data.tags["evaluated_run_id"] == info.run_id != run.info.run_id
    stored = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{gate.PER_TASK}/5w1s.json")
    assert stored == {"setting": "5w1s", "episodes_digest": TOY_DIGEST, "task_accuracies": accuracies}
    assert run.data.metrics[METRIC] == pytest.approx(0.7) == float(info.tags[METRIC]) and sorted(set(accuracies)) == pytest.approx([0.5, 0.9])
    evidence = gate.evidence(info.version, info.run_id, info.tags[gate.EVALUATION_RUN_TAG], METRIC)
    assert evidence.task_accuracies.tolist() == accuracies and evidence.digest == TOY_DIGEST and evidence.run_id == run.info.run_id


def test_a_version_whose_evaluation_cannot_be_trusted_is_refused_with_one_line(model_uri):
    """The gate believes an evaluation run only when it names this version's run; production without the metric,
    an evaluation run without its per-task file, or a run that is gone are refusals, never a free pass."""
    v1 = register_evaluated(model_uri, NAME, 0.9)
    registry.promote(NAME, v1, METRIC)
    client = mlflow.MlflowClient()

    worse = register_evaluated(model_uri, NAME, 0.5)
    client.delete_model_version_tag(NAME, v1, gate.EVALUATION_RUN_TAG)  # production now reads its training run: no metric
    with pytest.raises(RegistryError, match=r"production v1's run \w+ records no acc_5w1s, so there is nothing to compare"):
        registry.promote(NAME, worse, METRIC)
    client.set_model_version_tag(NAME, v1, gate.EVALUATION_RUN_TAG, registry.get_version(NAME, worse).tags[gate.EVALUATION_RUN_TAG])

    with mlflow.start_run() as other:  # an evaluation of some other model
        mlflow.log_metric(METRIC, 0.99)
    borrowed = register_evaluated(model_uri, NAME, 0.5)
    client.set_model_version_tag(NAME, borrowed, gate.EVALUATION_RUN_TAG, other.info.run_id)
    with pytest.raises(RegistryError, match=rf"v{borrowed}'s evaluation_run_id names run {other.info.run_id}, which evaluated run None"):
        registry.promote(NAME, borrowed, METRIC)

    no_file = register_evaluated(model_uri, NAME, 0.99)
    evaluation = registry.get_version(NAME, no_file).tags[gate.EVALUATION_RUN_TAG]
    mlflow.MlflowClient().delete_run(evaluation)
    with pytest.raises(RegistryError, match=rf"v{no_file}'s evaluation run {evaluation} does not exist"):
        registry.promote(NAME, no_file, METRIC)
    assert registry.get_alias(NAME).version == v1
