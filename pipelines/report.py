"""Stage `report`: every method of params.yaml side by side, from their evaluation and training records, with
the other stages' results a reader looks for on the same page.

Reads metrics/<m>/{eval.json,train_curve.csv}, runs/<m>/train.json, metrics/shift/, the committed MAML memory
benchmark (bench/results/*maml_memory*), metrics/learned_optimizer/report.json and reports/learned_optimizer/curves.png
(optimizer_eval), metrics/tta/report.{json,png} (tta_report). Outputs: reports/summary.md,
reports/{shots_curve,training_curves,maml_memory}.png, reports/plots/ (the figures' data, DVC plots), and one
MLflow run `report` (tag stage=report) in the dataset's experiment with all of it as artifacts.
"""

from __future__ import annotations

from pathlib import Path

from _stage import ROOT, params, run_guarded

from metaflowlib import tracking
from metaflowlib.config import Params
from metaflowlib.config.methods import method_spec
from metaflowlib.config.shift import ShiftParams
from metaflowlib.data.store import load_format, load_info
from metaflowlib.errors import DataError
from metaflowlib.io import atomic_path, read_json
from metaflowlib.report.summary import (
    MEMORY_PNG,
    SHOTS_PNG,
    TRAINING_PNG,
    MethodRecord,
    load_memory_benchmarks,
    markdown,
    memory_markdown,
    optimizer_markdown,
    plot_data,
    plot_memory,
    plot_shots_curves,
    plot_training_curves,
    read_training_curve,
    shift_markdown,
    training_markdown,
    tta_markdown,
    write_plot_data,
)
from metaflowlib.runtime import device_name, resolve_device

REPORTS = Path("reports")
# other stages' figures the page links and the run keeps (path -> the stage that writes it)
LINKED = {REPORTS / "learned_optimizer" / "curves.png": "optimizer_eval", Path("metrics") / "tta" / "report.png": "tta_report"}


def required(root: Path, path: Path, stage: str) -> Path:
    if not (root / path).is_file():
        raise DataError(f"{path} is missing: run `dvc repro {stage}`")
    return root / path


def method_records(p: Params, root: Path) -> list[MethodRecord]:
    records, fmt = [], load_format(root / "data" / "prepared")
    for key in p.trained:
        trained, evaluated = (f"import@{key}",) * 2 if key in p.paper_runs else (f"train@{key}", f"evaluate@{key}")
        metrics = required(root, Path("metrics") / key / "eval.json", evaluated)
        train = required(root, Path("runs") / key / "train.json", trained)
        curve = required(root, Path("metrics") / key / "train_curve.csv", trained)
        if key in p.paper_runs:  # the architecture its omega was saved with
            kind, config = (read_json(required(root, Path("models") / key / "config.json", trained))[k] for k in ("kind", "config"))
        else:
            mp = method_spec(p, key)
            kind, config = mp.kind, mp.model_config_dict(fmt.image_size, fmt.channels)
        records.append(MethodRecord(key, kind, config, read_json(metrics), read_json(train), read_training_curve(curve)))
    return records


def write_report(p: Params, root: Path) -> str:
    """Write the page, figures and plot data under root/reports, log them as one MLflow run; returns its id."""
    records = method_records(p, root)
    benchmarks = load_memory_benchmarks(root / "bench" / "results")
    optimizer = read_json(required(root, Path("metrics") / "learned_optimizer" / "report.json", "optimizer_eval"))
    tta = read_json(required(root, Path("metrics") / "tta" / "report.json", "tta_report"))
    linked = {required(root, path, stage): f"figures/{stage}" for path, stage in LINKED.items()}
    device = resolve_device(p.device)
    info = load_info(root / "data" / "prepared")
    v = p.train.validation
    validation = f"{v.ways}-way {v.shots}-shot, {v.tasks} tasks"

    page = markdown(records, list(p.evaluate.settings), p.profile, f"{p.data.name}, {device_name(device)}",
                    published=p.data.name == "omniglot-vinyals")
    page += f"\nTest split: {info['splits']['test']['classes']} classes; {p.evaluate.tasks} tasks per setting, seed {p.evaluate.seed}.\n"
    shifted = {key: read_json(path) for key in p.shift.methods if (path := root / "metrics" / "shift" / f"{key}.json").is_file()}
    if shifted:
        page += shift_markdown(shifted)
    page += training_markdown(records, validation) + memory_markdown(benchmarks) + optimizer_markdown(optimizer) + tta_markdown(tta)
    page += (f"\nEvery figure's data is in `reports/plots/` (`dvc plots show`); the page, the figures and their data are "
             f"also the artifacts of the MLflow run `report` in experiment `{p.experiment}`.\n")

    out = root / REPORTS
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(page)
    plot_shots_curves(records, out / SHOTS_PNG)
    plot_training_curves(records, validation, out / TRAINING_PNG)
    plot_memory(benchmarks, out / MEMORY_PNG)
    write_plot_data(plot_data(records, benchmarks), out / "plots")
    figures = {out / SHOTS_PNG: "figures", out / TRAINING_PNG: "figures", out / MEMORY_PNG: "figures", **linked}
    return log_summary_run(p, root, device, out, figures)


def log_summary_run(p: Params, root: Path, device, out: Path, figures: dict[Path, str]) -> str:
    """One MLflow run `report` in the dataset's experiment: summary.md, every figure (into `figures[path]`) and
    the figures' data (plot_data/)."""
    import mlflow

    tags = {"profile": p.profile, "dataset": p.data.name}
    with tracking.stage_run(p, "report", "report", tags=tags, device=device, params={"methods": ",".join(p.trained)}) as run:
        mlflow.log_artifact(str(out / "summary.md"))
        for path, folder in figures.items():
            mlflow.log_artifact(str(path), folder)
        mlflow.log_artifacts(str(out / "plots"), "plot_data")
    return run.info.run_id


def main() -> None:
    p = params(shift=ShiftParams)
    run_id = write_report(p, ROOT)
    print(f"report: {len(p.trained)} methods -> reports/summary.md, {SHOTS_PNG}, {TRAINING_PNG}, {MEMORY_PNG}, "
          f"reports/plots/; MLflow run {run_id} ('report', experiment {p.experiment})")


if __name__ == "__main__":
    run_guarded(main)
