"""The methods side by side: accuracy per setting, accuracy as shots grow, and what each cost.

Built from the evaluation and training records of every method (the same
fixed test tasks for all of them), so a reader sees in one page where each
method stops improving with more shots and what its meta-training took; then
how meta-training went (training curves), what the MAML family costs in memory
(the committed benchmark), and the other stages' results (learned optimizer,
test-time adaptation) where one summary page can link them. Plot data is written
as JSON next to the PNGs, for `dvc plots show`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Any

from metaflowlib.io import atomic_path
from metaflowlib.methods import METHODS
from metaflowlib.models.backbones import backbone_spec
from metaflowlib.report.render import measured, pyplot, save_png, table_row

CURVES = ("train_loss", "val_accuracy")  # columns of metrics/<m>/train_curve.csv the report plots
# the figures, next to summary.md (which links them by these names)
SHOTS_PNG, TRAINING_PNG, MEMORY_PNG = "shots_curve.png", "training_curves.png", "maml_memory.png"
SMOOTHING = 25  # the training-loss figure draws each curve's trailing mean over 1/25 of its points (raw: faint)


# Published Omniglot (Vinyals split) accuracy, %, for the settings the papers report.
PUBLISHED: dict[str, tuple[str, dict[str, float]]] = {
    "protonet": ("Snell et al. 2017", {"5w1s": 98.8, "5w5s": 99.7, "20w1s": 96.0, "20w5s": 98.9}),
    "maml": ("Finn et al. 2017", {"5w1s": 98.7, "5w5s": 99.9, "20w1s": 95.8, "20w5s": 98.9}),
    "fomaml": ("Finn et al. 2017, first order", {"5w1s": 98.3, "5w5s": 99.2, "20w1s": 89.4, "20w5s": 97.9}),
    "reptile": ("Nichol et al. 2018, transductive", {"5w1s": 97.68, "5w5s": 99.48, "20w1s": 89.43, "20w5s": 97.12}),
    "imaml": ("Rajeswaran et al. 2019", {"5w1s": 99.16, "5w5s": 99.67, "20w1s": 94.46, "20w5s": 98.69}),
}


@dataclass(frozen=True)
class MethodRecord:
    """One method's numbers: its params key, kind, config, eval.json and train.json."""

    key: str
    kind: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    train: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # CURVES column -> (episode, value)

    @property
    def transductive(self) -> bool:
        return METHODS[self.kind].transductive

    def shots_curve(self) -> dict[int, float]:
        prefix = "curve_acc_5w"
        return {int(k[len(prefix) : -1]): v for k, v in self.metrics.items() if k.startswith(prefix)}


def _pct(value: float | None, ci: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f} ± {100 * ci:.2f}" if ci is not None else f"{100 * value:.2f}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _memory(train: dict[str, Any]) -> str:
    meta = f"{train.get('peak_memory_mb', 0):.0f}"
    return f"{train['pretrain_peak_memory_mb']:.0f} / {meta}" if "pretrain_peak_memory_mb" in train else meta


def variant(record: MethodRecord) -> str:
    """What a reader must know to read the numbers (which variant, transductive or not)."""
    notes = []
    backbone = backbone_spec(record.config.get("backbone", "conv4"))["kind"]
    if backbone != "conv4":
        notes.append(f"{backbone} backbone")
    if record.kind == "param_prediction":
        phi = "linear" if not record.config.get("predictor_hidden") else f"MLP({record.config['predictor_hidden']})"
        notes.append(f"phi {phi}" + (" + prototype term" if record.config.get("combine_prototypes") else ""))
    if "inner_steps_eval" in record.config:
        notes.append(f"{record.config['inner_steps_eval']} test step(s), alpha {record.config['inner_lr']}")
    notes.append("transductive BN" if record.transductive else "non-transductive")
    return "; ".join(notes)


def markdown(records: list[MethodRecord], settings: list[str], profile: str, device: str, published: bool = False) -> str:
    """The report page: three tables; with `published`, each method's published figures under its row."""
    lines = [f"# Methods side by side (profile `{profile}`, {device})", "",
             ("Accuracy (%) ± 95% CI on the same fixed test tasks for every method; — = not scored "
             "(a fixed N-way head is scored on N-way tasks only)."), "",
             table_row(["method", "variant", *settings]), "|---|---|" + "---|" * len(settings)]
    for r in records:
        cells = [_pct(r.metrics.get(f"acc_{s}"), r.metrics.get(f"ci95_{s}")) for s in settings]
        lines.append(table_row([f"{r.key} ({r.kind})", variant(r), *cells]))
        if published and r.kind in PUBLISHED:
            source, numbers = PUBLISHED[r.kind]
            cells = [f"{numbers[s]:.2f}" if s in numbers else "—" for s in settings]
            lines.append(table_row(["↳ published", f"{source}, to convergence on a GPU", *cells]))
    shots = sorted({k for r in records for k in r.shots_curve()})
    lines += ["", "5-way accuracy (%) as shots grow (where each method stops improving):", "",
              table_row(["method", *(f"{k} shot" for k in shots)]), "|---|" + "---|" * len(shots)]
    for r in records:
        curve = r.shots_curve()
        lines.append(table_row([r.key, *(_pct(curve.get(k)) for k in shots)]))
    lines += ["", f"![5-way test accuracy vs shots, one line per method]({SHOTS_PNG})"]
    measure, memory = measured([_memory(r.train) for r in records], [r.train["memory_kind"] for r in records])
    lines += ["", ("Cost of meta-training and adaptation (peak memory as metaflowlib.memory names it: process_peak_rss, "
              "the training process's peak RSS; cuda_max_allocated, the CUDA allocator's peak):"), "",
              ("| method | pre-training s | episodic meta-training s | total s | episodes | trainable omega "
               f"| peak memory MiB, {measure} (pre-training / meta-training) | adaptation ms/task |"), "|---|---|---|---|---|---|---|---|"]
    for r, peak in zip(records, memory):
        pre = r.train.get("pretrain_seconds")
        meta = r.train.get("meta_train_seconds")
        total = (pre or 0) + (meta or 0)
        lines.append(f"| {r.key} | {_seconds(pre)} | {_seconds(meta)} | {_seconds(total)} | {r.train.get('meta_train_episodes', '—')} "
                     f"| {r.train.get('meta_parameters', '—'):,} | {peak} "
                     f"| {r.metrics.get('adaptation_ms_per_task', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def shift_markdown(reports: dict[str, dict[str, Any]]) -> str:
    """Few-shot learners under shift: clean vs corrupted accuracy per test-time strategy."""
    first = next(iter(reports.values()))
    lines = ["", f"## Under shift (Omniglot-C, severity {first['severity']}, {first['setting']}, {first['tasks']} tasks per corruption)", "",
             ("Accuracy (%) of each production model, clean and averaged over the corruptions; worst = the corruption "
              "it handles worst. `source` of a MAML-family model already fine-tunes on each task's support set."), "",
             "| method | version | strategy | clean | mean corrupted | worst corruption | ms / task |", "|---|---|---|---|---|---|---|"]
    for key, report in reports.items():
        for strategy, row in report["summary"].items():
            by = {c: a for c, a in report["accuracy"][strategy].items() if c != "clean"}
            worst = min(by, key=by.get)
            lines.append(f"| {key} | v{report['model']['version']} | {strategy} | {_pct(row['clean'])} | {_pct(row['mean_corrupted'])} "
                         f"| {worst} {_pct(by[worst])} | {1000 * row['seconds_per_task']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_shots_curves(records: list[MethodRecord], path: str | Path) -> None:
    """Accuracy vs shots, one line per method, as a PNG (written atomically)."""
    figure, axis = pyplot().subplots(figsize=(7.5, 4))
    for r in records:
        curve = sorted(r.shots_curve().items())
        if curve:
            axis.plot([k for k, _ in curve], [100 * v for _, v in curve], marker="o", label=r.key)
    axis.set_xlabel("shots (5-way)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_xscale("log")
    shots = sorted({k for r in records for k in r.shots_curve()})
    axis.set_xticks(shots, [str(k) for k in shots])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
    axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    save_png(figure, path, dpi=120, tight=True)


def read_training_curve(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics/<m>/train_curve.csv (written by train@<m>) -> CURVES column -> [(episode, value)], empty cells
    (validation runs every `train.val_every` episodes, the training loss more often) left out."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {c: [(int(row["episode"]), float(row[c])) for row in rows if row.get(c)] for c in CURVES}


def training_markdown(records: list[MethodRecord], validation: str) -> str:
    """The training-curves section: the figure, and where each curve ended."""
    lines = ["", "## Meta-training curves", "",
             (f"Training loss (each method's own meta-objective, so not comparable across methods) and validation "
              f"accuracy ({validation}) against meta-training episodes (a MAML-family episode is one meta-step over a "
              "meta-batch of tasks); from `metrics/<method>/train_curve.csv`."), "",
             f"![training loss and validation accuracy vs episode, one line per method]({TRAINING_PNG})", "",
             "| method | episodes | last training loss | validations | best validation accuracy (%) |", "|---|---|---|---|---|"]
    for r in records:
        loss, val = r.curves.get("train_loss", []), r.curves.get("val_accuracy", [])
        last = f"{loss[-1][1]:.4f}" if loss else "—"
        best = f"{100 * max(v for _, v in val):.2f}" if val else "—"
        lines.append(f"| {r.key} | {r.train.get('meta_train_episodes', '—')} | {last} | {len(val)} | {best} |")
    return "\n".join(lines) + "\n"


def plot_training_curves(records: list[MethodRecord], validation: str, path: str | Path) -> None:
    """Training loss and validation accuracy vs episode (log scales: budgets span 40 to 20000 episodes), as a PNG."""
    import numpy as np

    plt = pyplot()
    figure, (loss_axis, val_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    for color, r in zip(cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"]), records):
        loss, val = r.curves.get("train_loss", []), r.curves.get("val_accuracy", [])
        if loss:
            episodes, values = map(np.asarray, zip(*loss))
            loss_axis.plot(episodes, values, color=color, linewidth=0.6, alpha=0.25)
            loss_axis.plot(episodes, trailing_mean(values, max(1, len(values) // SMOOTHING)), color=color, linewidth=1.6,
                           label=r.key)
        if val:
            episodes, accuracy = zip(*val)
            val_axis.plot(episodes, [100 * a for a in accuracy], color=color, marker="o" if len(val) <= 20 else None,
                          markersize=4, label=r.key)
    loss_axis.set(xscale="log", yscale="log", xlabel="meta-training episode (log scale)",
                  ylabel="training loss (log scale)", title="training loss, each method's own objective (faint: raw)")
    val_axis.set(xscale="log", xlabel="meta-training episode (log scale)", ylabel="validation accuracy (%)",
                 title=f"validation accuracy, {validation}")
    for axis in (loss_axis, val_axis):
        axis.grid(alpha=0.3, which="both")
    val_axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    save_png(figure, path, dpi=120, tight=True)


def trailing_mean(values: Any, window: int) -> Any:
    """Mean of each value and the `window - 1` before it (fewer at the start), so the curve keeps its first points."""
    import numpy as np

    sums = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(0, end - window)
    return (sums[end] - sums[start]) / (end - start)


def load_memory_benchmarks(results: str | Path) -> dict[str, dict[str, Any]]:
    """Every `bench/maml_memory.py` results folder under `results` (`*maml_memory*/results.json`), by folder name."""
    from metaflowlib.errors import DataError

    found = {path.parent.name: json.loads(path.read_text()) for path in sorted(Path(results).glob("*maml_memory*/results.json"))}
    if not found:
        raise DataError(f"no MAML memory benchmark in {results}/*maml_memory*/results.json: run "
                        "`python bench/maml_memory.py --device cpu --out bench/results/maml_memory_cpu`")
    return found


def _kinds(benchmark: dict[str, Any]) -> list[str]:
    """The benchmark's methods in the order it ran them."""
    return list(dict.fromkeys(run["method"] for run in benchmark["runs"]))


def memory_markdown(benchmarks: dict[str, dict[str, Any]]) -> str:
    """Per results folder: peak memory and time per meta-step against inner steps, one row per method."""
    lines = ["", "## Memory of the MAML family", "",
             ("Peak memory (MiB) / time (ms) per meta-step against the number of inner steps, from the committed "
              "`python bench/maml_memory.py` results (each configuration in a fresh process)."), ""]
    for folder, b in benchmarks.items():
        steps = sorted({run["inner_steps"] for run in b["runs"]})
        shape = b["shape"]
        lines += [(f"`bench/results/{folder}`: {b['device']}, torch {b['torch']}, {b['threads']} threads; {shape['tasks']} tasks of "
                   f"{shape['ways']}-way {shape['shots']}-shot per meta-step; memory: {b['memory_measure']}."), "",
                  table_row(["method", *(f"{k} step{'s' if k > 1 else ''}" for k in steps)]), "|---|" + "---|" * len(steps)]
        for kind in _kinds(b):
            by_steps = {run["inner_steps"]: run for run in b["runs"] if run["method"] == kind}
            cells = [f"{by_steps[k]['peak_bytes'] / 2**20:.0f} / {1e3 * by_steps[k]['seconds_per_step']:.0f}" if k in by_steps else "—"
                     for k in steps]
            lines.append(table_row([kind, *cells]))
        ratio = b.get("vmap_vs_loop")
        if ratio:
            lines += ["", (f"{ratio['method']} with vmap over tasks vs the per-task loop ({ratio['inner_steps']} inner steps): "
                           f"{ratio['time_ratio_vmap_over_loop']:.2f}x the time, {ratio['memory_ratio_vmap_over_loop']:.2f}x the memory.")]
        lines.append("")
    lines.append(f"![peak memory and time per meta-step vs inner steps, one line per method]({MEMORY_PNG})")
    return "\n".join(lines) + "\n"


def plot_memory(benchmarks: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Peak memory and time per meta-step vs inner steps per method; one line style per results folder (device)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = pyplot()
    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    kinds = list(dict.fromkeys(kind for b in benchmarks.values() for kind in _kinds(b)))
    steps = sorted({run["inner_steps"] for b in benchmarks.values() for run in b["runs"]})
    for style, b in zip(cycle(("-", "--", ":", "-.")), benchmarks.values()):
        for kind in _kinds(b):
            runs = sorted((run for run in b["runs"] if run["method"] == kind), key=lambda run: run["inner_steps"])
            x = [run["inner_steps"] for run in runs]
            label = kind if len(benchmarks) == 1 else f"{kind} ({b['device_type']}, {b['shape']['tasks']} tasks)"
            color = colors[kinds.index(kind) % len(colors)]
            memory_axis.plot(x, [run["peak_bytes"] / 2**20 for run in runs], style, color=color, marker="o", label=label)
            time_axis.plot(x, [1e3 * run["seconds_per_step"] for run in runs], style, color=color, marker="o", label=label)
    devices = "; ".join(f"{b['device']}, {b['shape']['tasks']} tasks per meta-step" for b in benchmarks.values())
    memory_axis.set(ylabel="peak memory per meta-step (MiB)", title="peak memory per meta-step", ylim=(0, None))
    time_axis.set(yscale="log", ylabel="time per meta-step (ms, log scale)", title="time per meta-step")
    time_axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 100, 200, 500, 1000...: readable without exponents
    time_axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    time_axis.yaxis.set_minor_formatter(NullFormatter())
    for axis in (memory_axis, time_axis):
        axis.set(xscale="log", xlabel="inner steps (log scale)")
        axis.set_xticks(steps, [str(k) for k in steps])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    time_axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle(f"Conv-4 5-way 1-shot: {devices}")
    figure.tight_layout()
    save_png(figure, path, dpi=120, tight=True)


def plot_data(records: list[MethodRecord], benchmarks: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """What the PNGs show, as DVC plot files: plot -> file stem -> records with the same keys.

    train_loss/<method>, val_accuracy/<method>: (episode, value). maml_memory/<folder>, maml_step_time/<folder>:
    one record per inner-step count, one field per method (None where a method was not run), so one file is one
    chart with a line per method.
    """
    data: dict[str, dict[str, list[dict[str, Any]]]] = {c: {} for c in CURVES}
    for r in records:
        for c in CURVES:
            data[c][r.key] = [{"episode": episode, c: value} for episode, value in r.curves.get(c, [])]
    for plot, field_of in (("maml_memory", lambda run: run["peak_bytes"] / 2**20), ("maml_step_time", lambda run: 1e3 * run["seconds_per_step"])):
        data[plot] = {}
        for folder, b in benchmarks.items():
            kinds = _kinds(b)
            by = {(run["method"], run["inner_steps"]): field_of(run) for run in b["runs"]}
            data[plot][folder] = [{"inner_steps": k, **{kind: by.get((kind, k)) for kind in kinds}}
                                  for k in sorted({run["inner_steps"] for run in b["runs"]})]
    return data


def write_plot_data(data: dict[str, dict[str, list[dict[str, Any]]]], directory: str | Path) -> None:
    """`directory/<plot>/<stem>.json` for every plot, the whole directory replaced at once (no stale file stays)."""
    with atomic_path(directory, is_dir=True) as tmp:
        for plot, files in data.items():
            (tmp / plot).mkdir(parents=True)
            for stem, rows in files.items():
                (tmp / plot / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")


def optimizer_markdown(report: dict[str, Any]) -> str:
    """The optimizer_eval stage's pooled tables (its metrics/learned_optimizer/report.json) and curves, linked."""
    from metaflowlib.report.learned_optimizer import table

    horizons = [f"{m}x" for m in report["multiples"]]
    lines = ["", "## Learned optimizer vs Adam", "",
             (f"The production **{report['model']} v{report['version']}** against Adam (default and tuned lr) and SGD with "
              f"momentum on held-out optimizee tasks: final training loss and test accuracy, mean ± std over tasks, at "
              f"{', '.join(horizons)} the meta-training horizon H = {report['horizon']} steps (`dvc repro optimizer_eval`)."), ""]
    for group, title in (("seen", "Architectures seen in meta-training"), ("unseen", "Unseen architecture")):
        if by_optimizer := report["pooled"].get(group):
            learned_first = {name: by_optimizer[name] for name in sorted(by_optimizer, key=lambda name: name != "learned")}
            lines += [f"{title}:", "", *table(learned_first, horizons), ""]
    lines += ["![training loss and test accuracy per optimizee step, learned optimizer vs Adam and SGD](learned_optimizer/curves.png)",
              "", "Per suite: [learned_optimizer/summary.md](learned_optimizer/summary.md)."]
    return "\n".join(lines) + "\n"


def tta_markdown(report: dict[str, Any]) -> str:
    """Mean error per severity of each test-time strategy, from the tta_report stage's metrics/tta/report.json."""
    severities = [s for s in next(iter(report["mean_error"].values())) if s != "all"]
    ranked = sorted(report["mean_error"], key=lambda key: report["error_at_severity"][key]["mean"])
    lines = ["", "## Test-time adaptation on Fashion-MNIST-C", "",
             (f"Error (%) of the production classifier adapted online by each strategy, mean over the corruptions per "
              f"severity, best at severity {report['severity']} first (`dvc repro tta_report`; per corruption: "
              "[metrics/tta/report.md](../metrics/tta/report.md))."), "",
             "| strategy | model version | clean | " + " | ".join(f"severity {s}" for s in severities) + " | all | ms / batch (size) |",
             "|---|---|" + "---:|" * (len(severities) + 3)]
    for key in ranked:
        means, cost = report["mean_error"][key], report["cost"][key]
        cells = " | ".join(f"{100 * means[s]:.1f}" for s in severities)
        lines.append(f"| {key} | v{cost['model_version']} | {100 * report['error_clean'][key]:.1f} | {cells} | {100 * means['all']:.1f} "
                     f"| {cost['ms_per_batch']:.0f} ({cost['batch_size']}) |")
    lines += ["", "![error vs severity per strategy; error per corruption at the top severity](../metrics/tta/report.png)"]
    return "\n".join(lines) + "\n"
