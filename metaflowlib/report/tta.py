"""The comparison of strategies, shaped like Table 2 of the TENT paper (error % at severity 5 per corruption).

`build_report` turns the per-strategy metrics files into one JSON; `markdown`
and `plot` render it. Peak memory is what adapting added over the state before it
(the run record's `memory_kind`); extra memory is a strategy's peak above the
`source` strategy's (plain inference), where that strategy was run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaflowlib.data.corruptions import CORRUPTIONS
from metaflowlib.report.render import measured, pyplot, save_png, table_row

ABBREVIATIONS = {
    "gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
    "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost", "fog": "fog",
    "brightness": "brit", "contrast": "contr", "elastic_transform": "elast", "pixelate": "pixel", "jpeg_compression": "jpeg",
}
# Wang et al. 2021, Table 2: CIFAR-10-C severity 5, mean error % (ResNet-26; TTT from Sun et al. 2020)
PAPER_SEVERITY5 = {"source": 40.8, "bn": 17.3, "ttt": 17.5, "tent": 14.3}


def corruption_columns(at: dict[str, dict[str, float]]) -> list[str]:
    """The corruptions of a report row in ImageNet-C order (noise, blur, weather, digital), as the paper's table."""
    names = [c for c in next(iter(at.values())) if c != "mean"]
    return sorted(names, key=lambda c: CORRUPTIONS.index(c) if c in CORRUPTIONS else len(CORRUPTIONS))


def build_report(metrics: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """metrics/runs: strategy key -> its `tta@` metrics file / run record. Numbers only, for DVC metrics."""
    severity = max(int(s) for s in next(iter(metrics.values()))["mean_error"])
    top = str(severity)
    report: dict[str, Any] = {"severity": severity, "error_at_severity": {}, "mean_error": {}, "error_clean": {}, "cost": {}}
    for key, m in metrics.items():
        report["error_at_severity"][key] = {**{c: by[top] for c, by in m["error"].items()}, "mean": m["mean_error"][top]}
        report["mean_error"][key] = {**m["mean_error"], "all": m["mean_error_all"]}
        report["error_clean"][key] = m["error_clean"]
        base = metrics["source"]["peak_memory_mb"] if "source" in metrics else 0.0
        report["cost"][key] = {"ms_per_batch": m["ms_per_batch"], "batch_size": runs[key]["strategy"]["batch_size"],
                               "peak_memory_mb": m["peak_memory_mb"], "extra_memory_mb": m["peak_memory_mb"] - base,
                               "adapted_parameters": m["adapted_parameters"], "model_version": int(runs[key]["version"])}
    if PAPER_SEVERITY5.keys() <= metrics.keys():
        e = {k: report["error_at_severity"][k]["mean"] for k in PAPER_SEVERITY5}
        report["paper_order"] = bool(e["tent"] < min(e["bn"], e["ttt"], e["source"]) and max(e["bn"], e["ttt"]) < e["source"])
    return report


def markdown(report: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    severity, at = report["severity"], report["error_at_severity"]
    corruptions = corruption_columns(at)
    lines = [f"# Test-time adaptation: error (%) at severity {severity}", "",
             table_row(["strategy", "model", *(ABBREVIATIONS.get(c, c) for c in corruptions), "**mean**"]),
             "|---|---|" + "---:|" * (len(corruptions) + 1)]
    for key, errors in at.items():
        cells = [f"{100 * errors[c]:.1f}" for c in corruptions]
        lines.append(table_row([key, f"{runs[key]['name']} v{runs[key]['version']}", *cells, f"**{100 * errors['mean']:.1f}**"]))
    severities = [s for s in next(iter(report["mean_error"].values())) if s != "all"]
    strategies = list(report["mean_error"])
    measure, peaks = measured([f"{report['cost'][k]['peak_memory_mb']:.0f}" for k in strategies],
                              [runs[k]["memory_kind"] for k in strategies])
    lines += ["", "## Mean error (%) per severity", "",
              table_row(["strategy", "clean", *severities, "all", "ms / batch (size)", f"peak memory MiB, {measure}",
                         "extra vs source (MiB)", "adapted params"]),
              "|---|" + "---:|" * (len(severities) + 6)]
    for key, peak in zip(strategies, peaks):
        means, cost = report["mean_error"][key], report["cost"][key]
        cells = [f"{100 * means[s]:.1f}" for s in severities]
        lines.append(table_row([key, f"{100 * report['error_clean'][key]:.1f}", *cells, f"{100 * means['all']:.1f}",
                                f"{cost['ms_per_batch']:.1f} ({cost['batch_size']})", peak, f"{cost['extra_memory_mb']:.0f}",
                                cost["adapted_parameters"]]))
    ranking = sorted(at, key=lambda k: at[k]["mean"])
    lines += ["", f"Ranking at severity {severity}: " + " < ".join(f"{k} {100 * at[k]['mean']:.2f}" for k in ranking) + ".",
              "TENT paper (CIFAR-10-C, ResNet-26, severity 5): "
              + ", ".join(f"{k} {v}" for k, v in PAPER_SEVERITY5.items()) + "."]
    if "paper_order" in report:
        lines.append(f"Same order as the paper (TENT best, BN and TTT ahead of source): {'yes' if report['paper_order'] else 'no'}.")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Mean error vs severity (0 = clean) per strategy, and error per corruption at the top severity."""
    import numpy as np

    at = report["error_at_severity"]
    corruptions = corruption_columns(at)
    figure, (left, right) = pyplot().subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1, 2.5]})
    width = 0.8 / len(at)
    for i, (key, means) in enumerate(report["mean_error"].items()):
        severities = [s for s in means if s != "all"]
        left.plot([0, *map(int, severities)], [100 * report["error_clean"][key], *(100 * means[s] for s in severities)],
                  marker="o", label=key)
        right.bar(np.arange(len(corruptions)) + i * width, [100 * at[key][c] for c in corruptions], width, label=key)
    left.set(xlabel="severity (0 = clean)", ylabel="mean error (%)", title="error vs severity")
    right.set(ylabel="error (%)", title=f"severity {report['severity']}")
    right.set_xticks(np.arange(len(corruptions)) + 0.4 - width / 2, [ABBREVIATIONS.get(c, c) for c in corruptions])
    left.legend()
    right.legend(ncols=len(at))
    figure.tight_layout()
    save_png(figure, path, dpi=110)
