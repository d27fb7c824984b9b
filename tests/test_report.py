"""The side-by-side report: every method's numbers, the variant that gave them, and the plot."""

from __future__ import annotations

from metaflowlib.report import MethodRecord, markdown, plot_shots_curves, shift_markdown


def records() -> list[MethodRecord]:
    proto = MethodRecord("protonet", "protonet", {"distance": "euclidean"},
                         {"acc_5w1s": 0.977, "ci95_5w1s": 0.002, "acc_20w1s": 0.927, "ci95_20w1s": 0.002,
                          "curve_acc_5w1s": 0.977, "curve_acc_5w5s": 0.995, "curve_acc_5w10s": 0.996, "adaptation_ms_per_task": 0.9},
                         {"meta_train_seconds": 600.0, "meta_train_episodes": 2685, "meta_parameters": 111936, "peak_memory_mb": 1473.0})
    maml = MethodRecord("maml", "maml", {"inner_steps_eval": 1, "inner_lr": 0.4},
                        {"acc_5w1s": 0.889, "ci95_5w1s": 0.005, "curve_acc_5w1s": 0.889, "curve_acc_5w5s": 0.941,
                         "adaptation_ms_per_task": 43.0},
                        {"meta_train_seconds": 181.0, "meta_train_episodes": 91, "meta_parameters": 112261, "peak_memory_mb": 3945.0})
    predictor = MethodRecord("pp", "param_prediction", {"predictor_hidden": 256, "combine_prototypes": True},
                             {"acc_5w1s": 0.97, "ci95_5w1s": 0.002, "curve_acc_5w1s": 0.97, "adaptation_ms_per_task": 0.8},
                             {"meta_train_seconds": 60.0, "pretrain_seconds": 300.0, "pretrain_peak_memory_mb": 1481.0, "meta_train_episodes": 900,
                              "meta_parameters": 33000, "peak_memory_mb": 1200.0})
    return [proto, maml, predictor]


def test_tables_show_each_method_its_variant_and_costs():
    page = markdown(records(), ["5w1s", "20w1s"], "default", "omniglot-vinyals, cpu", published=True)
    lines = page.splitlines()
    assert "| protonet (protonet) | non-transductive | 97.70 ± 0.20 | 92.70 ± 0.20 |" in lines
    assert "| maml (maml) | 1 test step(s), alpha 0.4; transductive BN | 88.90 ± 0.50 | — |" in lines  # 5-way head: no 20-way score
    assert "| ↳ published | Snell et al. 2017, to convergence on a GPU | 98.80 | 96.00 |" in lines
    assert sum(line.startswith("| ↳ published") for line in lines) == 2  # no published Omniglot figure for parameter prediction
    assert "| pp (param_prediction) | phi MLP(256) + prototype term; non-transductive | 97.00 ± 0.20 | — |" in lines
    assert "| protonet | 97.70 | 99.50 | 99.60 |" in lines and "| maml | 88.90 | 94.10 | — |" in lines
    assert "| pp | 300 | 60 | 360 | 900 | 33,000 | 1481 / 1200 | 0.80 |" in lines
    assert "| protonet | — | 600 | 600 | 2685 | 111,936 | 1473 | 0.90 |" in lines


def test_shots_plot_is_a_png(tmp_path):
    path = tmp_path / "curve.png"
    plot_shots_curves(records(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_shift_table_names_the_version_strategy_and_worst_corruption():
    report = {"model": {"name": "x-protonet", "version": "3"}, "setting": "5w1s", "severity": 5, "tasks": 50,
              "summary": {"source": {"clean": 0.97, "mean_corrupted": 0.80, "seconds_per_task": 0.05},
                          "bn": {"clean": 0.96, "mean_corrupted": 0.85, "seconds_per_task": 0.06}},
              "accuracy": {"source": {"clean": 0.97, "fog": 0.55, "contrast": 0.78}, "bn": {"clean": 0.96, "fog": 0.42, "contrast": 0.83}}}
    lines = shift_markdown({"protonet": report}).splitlines()
    assert "| protonet | v3 | source | 97.00 | 80.00 | fog 55.00 | 50 |" in lines
    assert "| protonet | v3 | bn | 96.00 | 85.00 | fog 42.00 | 60 |" in lines
