"""The benchmark harness: peers compute what we compute, every case runs and reports, ratios come from one run."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import class_images

from metaflowlib_bench import cases, minimal, peers
from metaflowlib_bench.suite import limits, main, markdown, ratios, run_isolated
from metaflowlib_bench.timing import rate, spread
from metaflowlib.episodes import fixed_episodes


@pytest.fixture(scope="module")
def pools_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pools file: 8 classes of 20 28x28 images per split, each class its own stroke pattern (learnable)."""
    arrays = {}
    for seed, split in enumerate(cases.SPLITS):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = class_images(8, 20, seed=seed)
    path = tmp_path_factory.mktemp("pools") / "pools.npz"
    cases.write_pools(path, arrays, "tiny-synthetic")
    return path


@pytest.fixture
def peer_workarounds_undone() -> Iterator[None]:
    """easyfsl's workarounds (a stub torchvision, a patched Sampler) must not leak into the other tests."""
    from torch.utils.data import Sampler

    modules, init, notes = set(sys.modules), Sampler.__init__, list(peers.NOTES)
    yield
    for name in set(sys.modules) - modules:
        if name.split(".")[0] in ("torchvision", "easyfsl"):
            del sys.modules[name]
    Sampler.__init__, peers.NOTES[:] = init, notes  # type: ignore[method-assign]


def test_peers_compute_the_same_float64_maml_meta_gradient_as_ours() -> None:
    row = cases.maml_gradient_agreement(inner_steps=2, tasks=2, hidden=8)
    for name in ("ours-vmap", "higher", "torchopt"):
        assert row[f"{name}_relative_difference"] < 1e-10, row


def test_the_minimal_loop_computes_our_second_order_maml_meta_gradient() -> None:
    row = cases.maml_gradient_agreement(inner_steps=1, tasks=2, hidden=8)
    assert row["minimal_relative_difference"] < 1e-10, row


def test_the_minimal_loop_draws_distinct_classes_and_examples_on_the_pools_device(pools_path: Path) -> None:
    pools, _ = cases.load_pools(pools_path, torch.device("cpu"))
    tasks = minimal.DeviceTasks(pools["train"], seed=0)
    positions = tasks.draw(3, 5, 4)  # [T, N, K+Q]
    classes = torch.repeat_interleave(torch.arange(8), pools["train"].counts)[positions]
    assert positions.shape == (3, 5, 4) and (classes == classes[..., :1]).all()
    assert all(classes[t, :, 0].unique().numel() == 5 and positions[t].unique().numel() == 20 for t in range(3))
    with pytest.raises(ValueError, match="CUDA only"):
        minimal.protonet_step(pools["train"], 5, 1, 3, torch.device("cpu"), compile=True)


def test_the_minimal_protonet_loop_runs_in_quick_mode_and_reports_what_the_summary_reads(pools_path: Path) -> None:
    config = {"device": "cpu", "case": "protonet_training", "ways": 5, "shots": 1, "queries": 5, "warmup": 1, "steps": 1,
              "repeats": 1}
    rows = [cases.run_case({**config, "library": library, "variant": variant}, pools_path)
            for library, variant in (("ours", "fp32"), ("minimal", "eager"))]
    limit = rows[1]
    assert (limit["library"], limit["variant"], limit["episode"], limit["data"]) == ("minimal", "eager", "5w1s5q", "tiny-synthetic")
    assert limit["episodes_per_second"]["median"] > 0 and limit["sampling_seconds"] > 0 and limit["sampling_share_of_step"] > 0
    assert isinstance(limit["peak_bytes"], int) and limit["memory_kind"] == rows[0]["memory_kind"]
    [paired] = limits(rows)
    assert (paired["ours"], paired["peer_variant"]) == ("fp32", "eager") and not ratios(rows)
    text = markdown({"device": "cpu", "torch": "x", "threads": 1, "rows": rows, "ratios": [], "limits": [paired], "notes": []})
    assert "## ours / minimal loop (same run)" in text and "| protonet_training | 5w1s5q | fp32 | eager |" in text
    assert "- sampling, minimal eager 5w1s5q:" in text and "| 5w1s5q | minimal | eager |" in text


@pytest.mark.usefixtures("peer_workarounds_undone")
def test_easyfsl_episodes_come_from_its_task_sampler_with_the_requested_shape(pools_path: Path) -> None:
    pools, _ = cases.load_pools(pools_path, torch.device("cpu"))
    support_x, support_y, query_x, _, class_ids = next(peers.easyfsl_episodes(pools["train"], 5, 2, 3, 0, False))
    assert support_x.shape == (10, 1, 28, 28) and query_x.shape == (15, 1, 28, 28)
    assert sorted(support_y.tolist()) == sorted(list(range(5)) * 2) and len(set(class_ids)) == 5
    # the workarounds this torch needs are recorded, so the output says what ran
    from torch.utils.data import Sampler

    assert "data_source" in Sampler.__init__.__code__.co_varnames
    assert all("torchvision" in note or "Sampler" in note for note in peers.NOTES)


def test_rate_counts_items_per_second_over_timed_blocks_only() -> None:
    calls = []
    result = rate(lambda: calls.append(1), 4, torch.device("cpu"), warmup=2, steps=3, repeats=2)
    assert len(calls) == 2 + 3 * 2 and len(result["runs"]) == 2 and result["min"] <= result["median"] <= result["max"]
    assert spread([3.0, 1.0, 2.0])["median"] == 2.0


def test_time_to_accuracy_respects_the_budget_halves_the_rate_and_scores_fixed_test_tasks(pools_path: Path) -> None:
    config = {"device": "cpu", "case": "time_to_accuracy", "method": "protonet", "seconds": 1.5, "halvings": 2,
              "train": {"ways": 5, "shots": 1, "queries": 5, "tasks": 1}, "precision": "fp32",
              "validation": {"ways": 5, "shots": 1, "queries": 5, "tasks": 10}, "val_every": 5,
              "targets": [0.0, 1.01], "test_settings": ["5w1s"]}
    row = cases.run_case(config, pools_path)
    assert row["training_seconds"] >= 1.5 and row["meta_steps"] > 0 and row["curve"]
    # the rate halves on the clock (at 1/3 and 2/3 of the budget); the last step may land before 2/3 on a slow machine
    assert row["final_lr"] in (pytest.approx(1e-3 / 2), pytest.approx(1e-3 / 4))
    assert row["seconds_to_val_target"]["0.0"] is not None and row["seconds_to_val_target"]["1.01"] is None
    # the pipeline's 1000 fixed 5w1s15q test tasks; chance is 0.2, and on these separable classes even an untrained
    # Conv-4 scores about 0.95 (so this checks the scoring, not the 1.5 s of learning)
    pools, _ = cases.load_pools(pools_path, torch.device("cpu"))
    test = row["test"]["acc_5w1s"]
    assert test["digest"] == fixed_episodes(pools["test"], 1000, 5, 1, 15, 2017).digest() and test["accuracy"] > 0.8, test


def test_adaptation_case_times_one_task_and_batched_evaluation(pools_path: Path) -> None:
    config = {"device": "cpu", "case": "adaptation", "method": "maml", "ways": 5, "shots": 1, "queries": 5,
              "warmup": 1, "steps": 2, "repeats": 1}
    row = cases.run_case(config, pools_path)
    assert 0 < row["adaptation_seconds_per_task"] and row["adapt_and_predict_seconds_per_task"]["median"] > 0
    assert row["evaluation_tasks_per_second"]["median"] > 0


def test_harness_runs_every_library_and_writes_ratios(pools_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    main(["--out", str(out), "--pools", str(pools_path), "--device", "cpu", "--quick", "--isolate", "no",
          "--only", "maml_training", "--maml-tasks", "4"])
    results = json.loads((out / "results.json").read_text())
    libraries = {(r["library"], r["variant"]) for r in results["rows"]}
    assert libraries == {("ours", "loop"), ("ours", "vmap"), ("higher", ""), ("torchopt", ""), ("minimal", "eager")}
    assert all("error" not in r and r["tasks_per_second"]["median"] > 0 and r["data"] == "tiny-synthetic"
               and r["tasks_per_step"] == 4 for r in results["rows"])
    assert {(r["ours"], r["peer"]) for r in results["ratios"]} == {(o, p) for o in ("loop", "vmap") for p in ("higher", "torchopt")}
    assert {(r["ours"], r["peer_variant"]) for r in results["limits"]} == {("loop", "eager"), ("vmap", "eager")}
    summary = (out / "summary.md").read_text()
    assert "## ours / peer (same run)" in summary and "## ours / minimal loop (same run)" in summary


def test_an_isolated_case_runs_in_a_fresh_process_and_reports_its_own_peak(pools_path: Path) -> None:
    config = {"device": "cpu", "case": "maml_training", "library": "ours", "variant": "loop", "ways": 5, "shots": 1,
              "queries": 5, "tasks": 2, "inner_steps": 1, "warmup": 1, "steps": 1, "repeats": 1}
    row = run_isolated(config, pools_path)
    assert row["data"] == "tiny-synthetic" and row["peak_bytes"] > 0 and row["tasks_per_second"]["median"] > 0
    assert row["memory_kind"] == "peak_rss_increase"  # Linux: the worker's own block, VmHWM reset on entry
    with pytest.raises(RuntimeError, match="no_such_case failed"):
        run_isolated({**config, "case": "no_such_case"}, pools_path)


def test_ratios_pair_ours_with_each_peer_on_the_same_episode_shape() -> None:
    def row(library: str, variant: str, episode: str, value: float, peak: int) -> dict:
        return {"case": "protonet_training", "library": library, "variant": variant, "episode": episode,
                "episodes_per_second": spread([value]), "peak_bytes": peak, "memory_kind": "peak_rss_increase", "sampling_seconds": 0.001,
                "sampling_share_of_step": 0.03}

    rows = [row("ours", "default", "5w1s15q", 30.0, 100), row("easyfsl", "", "5w1s15q", 10.0, 200),
            row("ours", "default", "60w5s5q", 3.0, 100), {"case": "protonet_training", "library": "easyfsl",
                                                         "variant": "", "episode": "60w5s5q", "error": "boom"}]
    [only] = ratios(rows)
    assert (only["episode"], only["speed_ratio"], only["memory_ratio"]) == ("5w1s15q", 3.0, 0.5)
    text = markdown({"device": "cpu", "torch": "x", "threads": 1, "rows": rows, "ratios": [only], "notes": ["n"]})
    assert "| 5w1s15q | ours | default | 30.00" in text and "3.00x" in text and "boom" in text
    assert "| episode | library | variant | rate | peak MiB, peak_rss_increase |" in text


def test_backbone_throughput_times_each_backbone_and_method_on_tiny_shapes() -> None:
    """bench/backbone_throughput.py's measurement, in-process on a tiny ResNet-12 (its CPU run is minutes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_backbone_throughput",
                                                  Path(__file__).resolve().parent.parent / "bench" / "backbone_throughput.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny = {"device": "cpu", "warmup": 1, "steps": 1, "side": 16, "widths": [4, 6, 8, 8], "shots": 1, "queries": 2}
    proto = script.measure("protonet", "resnet12", ways=3, tasks=1, **tiny)
    maml = script.measure("maml", "conv4", ways=3, tasks=2, **tiny)
    assert (proto["episode"], proto["images_per_second"] * proto["seconds_per_step_median"]) == ("3w1s2q", pytest.approx(9))
    assert proto["widths"] == [4, 6, 8, 8] and proto["memory_kind"] == maml["memory_kind"]
    assert isinstance(proto["peak_bytes"], int)  # in this process a tiny step's RSS increase may be 0 (pages resident)
    assert (maml["vectorize"], maml["inner_steps"], maml["second_order"]) == ("loop", 5, True)
    assert maml["seconds_per_task"] == pytest.approx(maml["seconds_per_step_median"] / 2)
