"""The side-by-side report: every method's numbers, the variant that gave them, and the plot."""

from __future__ import annotations

from metaflowlib.report.render import measured
from metaflowlib.report.summary import MethodRecord, markdown, plot_shots_curves, shift_markdown


def records() -> list[MethodRecord]:
    proto = MethodRecord("protonet", "protonet", {"distance": "euclidean"},
                         {"acc_5w1s": 0.977, "ci95_5w1s": 0.002, "acc_20w1s": 0.927, "ci95_20w1s": 0.002,
                          "curve_acc_5w1s": 0.977, "curve_acc_5w5s": 0.995, "curve_acc_5w10s": 0.996, "adaptation_ms_per_task": 0.9},
                         {"meta_train_seconds": 600.0, "meta_train_episodes": 2685, "meta_parameters": 111936, "peak_memory_mb": 1473.0,
                          "memory_kind": "process_peak_rss"})
    maml = MethodRecord("maml", "maml", {"inner_steps_eval": 1, "inner_lr": 0.4},
                        {"acc_5w1s": 0.889, "ci95_5w1s": 0.005, "curve_acc_5w1s": 0.889, "curve_acc_5w5s": 0.941,
                         "adaptation_ms_per_task": 43.0},
                        {"meta_train_seconds": 181.0, "meta_train_episodes": 91, "meta_parameters": 112261, "peak_memory_mb": 3945.0,
                         "memory_kind": "process_peak_rss"})
    predictor = MethodRecord("pp", "param_prediction", {"predictor_hidden": 256, "combine_prototypes": True},
                             {"acc_5w1s": 0.97, "ci95_5w1s": 0.002, "curve_acc_5w1s": 0.97, "adaptation_ms_per_task": 0.8},
                             {"meta_train_seconds": 60.0, "pretrain_seconds": 300.0, "pretrain_peak_memory_mb": 1481.0, "meta_train_episodes": 900,
                              "meta_parameters": 33000, "peak_memory_mb": 1200.0,
                              "memory_kind": "process_peak_rss"})
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
    assert "| method | pre-training s | episodic meta-training s | total s | episodes | trainable omega " \
           "| peak memory MiB, process_peak_rss (pre-training / meta-training) | adaptation ms/task |" in lines


def test_a_memory_column_names_its_measure_or_each_cells():
    assert measured(["12", "30"], ["peak_rss_increase", "peak_rss_increase"]) == ("peak_rss_increase", ["12", "30"])
    assert measured(["12", "30"], ["peak_rss_increase", "cuda_max_allocated_increase"]) == \
        ("kind per cell", ["12 (peak_rss_increase)", "30 (cuda_max_allocated_increase)"])


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


# --- training curves, the MAML memory benchmark, the other stages' results, the stage, DVC plots ---

import json
import shutil
import subprocess
import sys

import mlflow
import pytest
import yaml

from metaflowlib.errors import DataError
from metaflowlib.report.summary import (
    load_memory_benchmarks,
    memory_markdown,
    optimizer_markdown,
    plot_data,
    plot_memory,
    plot_training_curves,
    read_training_curve,
    trailing_mean,
    training_markdown,
    tta_markdown,
    write_plot_data,
)

from conftest import ROOT, load_stage

PNG = b"\x89PNG\r\n\x1a\n"


def write_curve(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["episode,train_loss,train_accuracy,val_accuracy,lr", *(",".join(map(str, row)) for row in rows)]
    path.write_text("\n".join(lines) + "\n")


def curve_rows(episodes, every_val):
    return [(e, 1.0 / e, 0.5, 0.5 + e / (4 * episodes[-1]) if e % every_val == 0 else "", 0.001) for e in episodes]


def benchmark(device_type, kinds=("maml", "fomaml"), steps=(1, 5), tasks=4):
    runs = [{"method": k, "inner_steps": s, "vectorize": "auto", "peak_bytes": (100 + 10 * s * (k == "maml")) * 2**20,
             "seconds_per_step": 0.1 * s} for k in kinds for s in steps]
    return {"device": f"{device_type} device", "device_type": device_type, "torch": "2.13.0", "threads": 2,
            "memory_measure": "peak", "shape": {"ways": 5, "shots": 1, "queries": 15, "image_size": 28, "hidden": 64, "tasks": tasks},
            "repeats": 2, "runs": runs, "vmap_vs_loop": {"method": "maml", "inner_steps": 5, "time_ratio_vmap_over_loop": 1.4,
                                                          "memory_ratio_vmap_over_loop": 1.36}}


def write_benchmarks(results, **folders):
    for folder, data in folders.items():
        (results / folder).mkdir(parents=True)
        (results / folder / "results.json").write_text(json.dumps(data))


def optimizer_report():
    def summary(loss):
        at = {f"{m}x": {"train_loss_mean": loss / m, "train_loss_std": 0.01, "test_accuracy_mean": 0.7, "test_accuracy_std": 0.1,
                        "diverged": 0, "tasks": 4, "step": 10 * m} for m in (1, 5, 10)}
        return {"at": at, "update_ms": 1.0, "step_ms": 2.0}

    pooled = {"seen": {"adam_tuned": summary(0.3), "learned": summary(0.1)}, "unseen": {"adam_tuned": summary(0.2), "learned": summary(0.4)}}
    return {"model": "toy-learned-optimizer", "version": "3", "horizon": 10, "multiples": [1, 5, 10], "pooled": pooled}


def tta_report():
    def means(top):
        return {"1": top / 2, "5": top, "all": 0.75 * top}

    return {"severity": 5, "mean_error": {"source": means(0.30), "tent": means(0.17)},
            "error_at_severity": {"source": {"mean": 0.30}, "tent": {"mean": 0.17}},
            "error_clean": {"source": 0.105, "tent": 0.101},
            "cost": {k: {"model_version": 2, "ms_per_batch": 31.2, "batch_size": 200} for k in ("source", "tent")}}


def test_training_curve_keeps_every_logged_value_and_skips_the_empty_cells(tmp_path):
    write_curve(tmp_path / "curve.csv", curve_rows([10, 20, 30, 40], every_val=20))
    curve = read_training_curve(tmp_path / "curve.csv")
    assert curve["train_loss"] == [(10, 0.1), (20, 0.05), (30, 1 / 30), (40, 0.025)]
    assert curve["val_accuracy"] == [(20, 0.625), (40, 0.75)]  # validations run every 20 episodes only
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]  # the first point is kept


def test_training_section_plot_and_dvc_data(tmp_path):
    proto, maml, _ = records()
    proto = MethodRecord(*[getattr(proto, f) for f in ("key", "kind", "config", "metrics", "train")],
                         {"train_loss": [(10, 0.9), (20, 0.5)], "val_accuracy": [(20, 0.95)]})
    maml = MethodRecord(*[getattr(maml, f) for f in ("key", "kind", "config", "metrics", "train")], {"train_loss": [(10, 1.2)], "val_accuracy": []})
    lines = training_markdown([proto, maml], "5-way 1-shot, 200 tasks").splitlines()
    assert "| protonet | 2685 | 0.5000 | 1 | 95.00 |" in lines and "| maml | 91 | 1.2000 | 0 | — |" in lines
    assert "![training loss and validation accuracy vs episode, one line per method](training_curves.png)" in lines
    plot_training_curves([proto, maml], "5-way 1-shot", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG

    data = plot_data([proto, maml], {"maml_memory_cpu": benchmark("cpu")})
    assert data["train_loss"]["protonet"] == [{"episode": 10, "train_loss": 0.9}, {"episode": 20, "train_loss": 0.5}]
    assert data["val_accuracy"] == {"protonet": [{"episode": 20, "val_accuracy": 0.95}], "maml": []}
    assert data["maml_memory"]["maml_memory_cpu"] == [{"inner_steps": 1, "maml": 110.0, "fomaml": 100.0},
                                                      {"inner_steps": 5, "maml": 150.0, "fomaml": 100.0}]
    write_plot_data(data, tmp_path / "plots")
    (tmp_path / "plots" / "train_loss" / "gone.json").write_text("[]")
    write_plot_data(data, tmp_path / "plots")  # replaced whole: a method no longer in params leaves no file behind
    assert sorted(p.name for p in (tmp_path / "plots" / "train_loss").iterdir()) == ["maml.json", "protonet.json"]
    assert json.loads((tmp_path / "plots" / "maml_step_time" / "maml_memory_cpu.json").read_text())[1] == \
        {"inner_steps": 5, "maml": 500.0, "fomaml": 500.0}


def test_memory_section_reads_every_results_folder_cpu_and_gpu(tmp_path):
    with pytest.raises(DataError, match=r"no MAML memory benchmark in .*: run `python bench/maml_memory.py"):
        load_memory_benchmarks(tmp_path)
    write_benchmarks(tmp_path, maml_memory_cpu=benchmark("cpu"), maml_memory_h100=benchmark("cuda", kinds=("maml",), steps=(1, 5, 20), tasks=32))
    (tmp_path / "other.json").write_text("{}")
    found = load_memory_benchmarks(tmp_path)
    assert list(found) == ["maml_memory_cpu", "maml_memory_h100"]
    lines = memory_markdown(found).splitlines()
    assert "| maml | 110 / 100 | 150 / 500 |" in lines and "| fomaml | 100 / 100 | 100 / 500 |" in lines
    assert "| maml | 110 / 100 | 150 / 500 | 300 / 2000 |" in lines  # the GPU folder's own inner steps
    assert "maml with vmap over tasks vs the per-task loop (5 inner steps): 1.40x the time, 1.36x the memory." in lines
    assert any(line.startswith("`bench/results/maml_memory_h100`: cuda device") and "32 tasks of 5-way 1-shot" in line for line in lines)
    data = plot_data([], found)
    assert data["maml_memory"]["maml_memory_h100"][-1] == {"inner_steps": 20, "maml": 300.0}
    plot_memory(found, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").read_bytes()[:8] == PNG


def test_optimizer_and_tta_sections_come_from_their_stages_reports():
    lines = optimizer_markdown(optimizer_report()).splitlines()
    assert any("**toy-learned-optimizer v3**" in line and "1x, 5x, 10x the meta-training horizon H = 10" in line for line in lines)
    seen = lines.index("Architectures seen in meta-training:")
    assert lines[seen + 2].startswith("| optimizer | train loss 1x | test acc 1x | train loss 5x")
    assert lines[seen + 4].startswith("| learned | 0.1000 ± 0.0100 | 0.700 ± 0.100 | 0.0200 ± 0.0100")  # learned first
    assert "![training loss and test accuracy per optimizee step, learned optimizer vs Adam and SGD](learned_optimizer/curves.png)" in lines

    lines = tta_markdown(tta_report()).splitlines()
    assert "| strategy | model version | clean | severity 1 | severity 5 | all | ms / batch (size) |" in lines
    rows = [line for line in lines if line.startswith(("| tent |", "| source |"))]
    assert rows == ["| tent | v2 | 10.1 | 8.5 | 17.0 | 12.8 | 31 (200) |", "| source | v2 | 10.5 | 15.0 | 30.0 | 22.5 | 31 (200) |"]
    assert "![error vs severity per strategy; error per corruption at the top severity](../metrics/tta/report.png)" in lines


@pytest.fixture
def project(tmp_path):
    """A project root holding what the report stage reads, for two methods."""
    from metaflowlib.config import parse_params
    from metaflowlib.config.shift import ShiftParams

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["methods"] = {"protonet": raw["methods"]["protonet"], "maml": raw["methods"]["maml"]}
    raw["shift"]["methods"] = ["protonet"]
    raw["optimizer"]["finetune"]["methods"] = ["maml"]
    p = parse_params(raw, shift=ShiftParams)
    root = tmp_path / "project"
    for r in records()[:2]:
        (root / "metrics" / r.key).mkdir(parents=True)
        (root / "metrics" / r.key / "eval.json").write_text(json.dumps(r.metrics))
        (root / "runs" / r.key).mkdir(parents=True)
        (root / "runs" / r.key / "train.json").write_text(json.dumps(r.train))
        write_curve(root / "metrics" / r.key / "train_curve.csv", curve_rows([10, 20, 30, 40], every_val=20))
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "prepared" / "info.json").write_text(json.dumps({"image_size": 28, "splits": {"test": {"classes": 1692}}}))
    write_benchmarks(root / "bench" / "results", maml_memory_cpu=benchmark("cpu", kinds=("maml", "fomaml", "reptile", "imaml")))
    (root / "metrics" / "learned_optimizer").mkdir(parents=True)
    (root / "metrics" / "learned_optimizer" / "report.json").write_text(json.dumps(optimizer_report()))
    (root / "metrics" / "tta").mkdir(parents=True)
    (root / "metrics" / "tta" / "report.json").write_text(json.dumps(tta_report()))
    (root / "metrics" / "tta" / "report.png").write_bytes(PNG)
    (root / "reports" / "learned_optimizer").mkdir(parents=True)
    (root / "reports" / "learned_optimizer" / "curves.png").write_bytes(PNG)
    return p, root


def test_report_stage_writes_the_page_figures_data_and_one_mlflow_run(project, mlflow_store):
    p, root = project
    run_id = load_stage("report").write_report(p, root)
    page = (root / "reports" / "summary.md").read_text()
    for heading in ("## Meta-training curves", "## Memory of the MAML family", "## Learned optimizer vs Adam",
                    "## Test-time adaptation on Fashion-MNIST-C"):
        assert heading in page
    for png in ("shots_curve.png", "training_curves.png", "maml_memory.png"):
        assert (root / "reports" / png).read_bytes()[:8] == PNG and f"]({png})" in page
    assert sorted(f.name for f in (root / "reports" / "plots" / "val_accuracy").iterdir()) == ["maml.json", "protonet.json"]

    run = mlflow.get_run(run_id)
    assert run.info.run_name == "report" and run.data.tags["stage"] == "report" and run.data.tags["dataset"] == "omniglot-vinyals"
    assert mlflow.get_experiment(run.info.experiment_id).name == p.experiment
    client = mlflow.MlflowClient()
    listed = lambda path=None: sorted(a.path for a in client.list_artifacts(run_id, path))
    assert listed() == ["figures", "plot_data", "summary.md"]
    assert listed("figures") == ["figures/maml_memory.png", "figures/optimizer_eval", "figures/shots_curve.png",
                                 "figures/training_curves.png", "figures/tta_report"]
    assert listed("figures/optimizer_eval") == ["figures/optimizer_eval/curves.png"]
    assert listed("figures/tta_report") == ["figures/tta_report/report.png"]
    assert listed("plot_data") == ["plot_data/maml_memory", "plot_data/maml_step_time", "plot_data/train_loss", "plot_data/val_accuracy"]

    (root / "metrics" / "tta" / "report.json").unlink()
    with pytest.raises(DataError, match=r"metrics/tta/report.json is missing: run `dvc repro tta_report`"):
        load_stage("report").write_report(p, root)


def test_dvc_plots_show_renders_every_report_plot(project, mlflow_store, tmp_path):
    """The top-level `plots:` of dvc.yaml against the report's real outputs, in a throwaway DVC repository."""
    p, root = project
    load_stage("report").write_report(p, root)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    shown = subprocess.run([*dvc, "plots", "show", "--json", "-o", str(tmp_path / "html")], check=False, cwd=root,
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    rendered = json.loads(shown.stdout)["data"]
    declared = [next(iter(d)) if isinstance(d, dict) else d for d in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]]
    for plot in declared:
        if plot.endswith(".png"):
            assert rendered[plot][0]["type"] == "image", plot
            continue
        files = sorted(k for k in rendered if k.startswith(plot + "/"))
        assert files, f"{plot} renders no chart"
        for name in files:
            content = rendered[name][0]["content"]
            assert rendered[name][0]["type"] == "vega" and content["data"]["values"], name
    memory = rendered["reports/plots/maml_memory/maml_memory_cpu.json"][0]["content"]["data"]["values"]
    assert {(v["dvc_inferred_y_value"], v["field"]) for v in memory if v["inner_steps"] == 5} >= {(150.0, "maml"), (100.0, "imaml")}
