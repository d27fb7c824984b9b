"""The learned-optimizer comparison as a reader sees it: tables (markdown), curves (CSV, PNG), flat metrics.

Every number comes from `benchmark.evaluation_report`; nothing here computes a result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaflowlib.io import write_csv
from metaflowlib.report.render import pyplot, save_png, table_row

CURVE_FIELDS = ["suite", "optimizer", "step", "train_loss_mean", "train_loss_std", "test_accuracy_mean",
                "test_accuracy_std", "tasks"]


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    return "—" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(by_optimizer: dict[str, Any], horizons: list[str]) -> list[str]:
    """One row per optimizer: final train loss and test accuracy (mean ± std over tasks) per horizon, step cost."""
    head = ["optimizer"] + [f"{c} {h}" for h in horizons for c in ("train loss", "test acc")]
    head += [f"diverged {horizons[-1]}", "update ms", "step ms"]
    rows = [table_row(head), "|" + "---|" * len(head)]
    for name, s in by_optimizer.items():
        cells = [name]
        for h in horizons:
            a = s["at"][h]
            cells += [_pm(a["train_loss_mean"], a["train_loss_std"]), _pm(a["test_accuracy_mean"], a["test_accuracy_std"], 3)]
        last = s["at"][horizons[-1]]
        cells += [f"{last['diverged']}/{last['tasks']}", f"{s['update_ms']:.2f}", f"{s['step_ms']:.2f}"]
        rows.append(table_row(cells))
    return rows


def markdown(report: dict[str, Any], header: list[str], titles: dict[str, str]) -> str:
    """The pooled tables (titled by `titles[group]`), then one table per suite."""
    horizons = list(next(iter(next(iter(report["suites"].values())).values()))["at"])
    lines = ["# Learned LSTM optimizer vs Adam and SGD with momentum on held-out optimizee tasks", "", *header, ""]
    for group, by_optimizer in report["pooled"].items():
        if by_optimizer:
            lines += [f"## {titles.get(group, group)}", "", *table(by_optimizer, horizons), ""]
    for suite, by_optimizer in report["suites"].items():
        lines += [f"### {suite}", "", *table(by_optimizer, horizons), ""]
    return "\n".join(lines)


def write_curves(report: dict[str, Any], path: Path) -> None:
    """Long-format CSV of the mean curves: one row per (suite, optimizer, recorded step)."""
    write_csv(path, ({"suite": suite, "optimizer": name, **point} for suite, by_optimizer in report["suites"].items()
                     for name, summary in by_optimizer.items() for point in summary["curve"]), CURVE_FIELDS)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """'<suite or group>/<optimizer>/<horizon>/<stat>' -> value, and the step costs: for MLflow and DVC."""
    out = {}
    for scope in ("pooled", "suites"):
        for where, by_optimizer in report[scope].items():
            for name, s in by_optimizer.items():
                for horizon, a in s["at"].items():
                    for key in ("train_loss_mean", "train_loss_std", "test_accuracy_mean", "test_accuracy_std", "diverged"):
                        if a[key] is not None:
                            out[f"{where}/{name}/{horizon}/{key}"] = a[key]
                out[f"{where}/{name}/update_ms"] = s["update_ms"]
                out[f"{where}/{name}/step_ms"] = s["step_ms"]
    return out


def plot(report: dict[str, Any], horizon: int, path: Path) -> None:
    """Per suite: mean full training loss (log scale) and test accuracy vs step, +- std band; dashed lines at the horizons."""
    suites = list(report["suites"])
    multiples = [int(h[:-1]) for h in next(iter(report["suites"][suites[0]].values()))["at"]]
    fig, axes = pyplot().subplots(len(suites), 2, figsize=(11, 2.8 * len(suites)), squeeze=False)
    for row, suite in zip(axes, suites):
        for name, summary in report["suites"][suite].items():
            points = [p for p in summary["curve"] if p["train_loss_mean"] is not None]
            steps = [p["step"] for p in points]
            for ax, key in zip(row, ("train_loss", "test_accuracy")):
                mean = [p[f"{key}_mean"] for p in points]
                std = [p[f"{key}_std"] for p in points]
                (line,) = ax.plot(steps, mean, label=name)
                low = [max(m - s, 1e-6) if key == "train_loss" else m - s for m, s in zip(mean, std)]
                ax.fill_between(steps, low, [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.15)
        row[0].set_yscale("log")
        row[0].set_ylabel(f"{suite}\ntrain loss")
        row[1].set_ylabel("test accuracy")
        for ax in row:
            for m in multiples[:-1]:
                ax.axvline(m * horizon, color="grey", linestyle="--", linewidth=0.8)
    axes[0][0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("optimizee step")
    fig.tight_layout()
    save_png(fig, path, dpi=90)
