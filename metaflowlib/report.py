"""The methods side by side: accuracy per setting, accuracy as shots grow, and what each cost.

Built from the evaluation and training records of every method (the same
fixed test tasks for all of them), so a reader sees in one page where each
method stops improving with more shots and what its meta-training took.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaflowlib.io import atomic_path
from metaflowlib.methods import METHODS


@dataclass(frozen=True)
class MethodRecord:
    """One method's numbers: its params key, kind, config, eval.json and train.json."""

    key: str
    kind: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    train: dict[str, Any]

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
    if record.kind == "param_prediction":
        phi = "linear" if not record.config.get("predictor_hidden") else f"MLP({record.config['predictor_hidden']})"
        notes.append(f"phi {phi}" + (" + prototype term" if record.config.get("combine_prototypes") else ""))
    if "inner_steps_eval" in record.config:
        notes.append(f"{record.config['inner_steps_eval']} test step(s), alpha {record.config['inner_lr']}")
    notes.append("transductive BN" if record.transductive else "non-transductive")
    return "; ".join(notes)


def markdown(records: list[MethodRecord], settings: list[str], profile: str, device: str) -> str:
    """The report page: three tables."""
    lines = [f"# Methods side by side (profile `{profile}`, {device})", "",
             ("Accuracy (%) ± 95% CI on the same fixed test tasks for every method; — = not scored "
             "(a fixed N-way head is scored on N-way tasks only)."), "",
             "| method | variant | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    for r in records:
        cells = [_pct(r.metrics.get(f"acc_{s}"), r.metrics.get(f"ci95_{s}")) for s in settings]
        lines.append(f"| {r.key} ({r.kind}) | {variant(r)} | " + " | ".join(cells) + " |")
    shots = sorted({k for r in records for k in r.shots_curve()})
    lines += ["", "5-way accuracy (%) as shots grow (where each method stops improving):", "",
              "| method | " + " | ".join(f"{k} shot" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for r in records:
        curve = r.shots_curve()
        lines.append(f"| {r.key} | " + " | ".join(_pct(curve.get(k)) for k in shots) + " |")
    lines += ["", ("Cost of meta-training and adaptation (peak memory: the training process's peak RSS on CPU, "
              "allocator peak on CUDA):"), "",
              ("| method | pre-training s | episodic meta-training s | total s | episodes | trainable omega "
               "| peak memory MiB (pre-training / meta-training) | adaptation ms/task |"), "|---|---|---|---|---|---|---|---|"]
    for r in records:
        pre = r.train.get("pretrain_seconds")
        meta = r.train.get("meta_train_seconds")
        total = (pre or 0) + (meta or 0)
        lines.append(f"| {r.key} | {_seconds(pre)} | {_seconds(meta)} | {_seconds(total)} | {r.train.get('meta_train_episodes', '—')} "
                     f"| {r.train.get('meta_parameters', '—'):,} | {_memory(r.train)} "
                     f"| {r.metrics.get('adaptation_ms_per_task', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def plot_shots_curves(records: list[MethodRecord], path: str | Path) -> None:
    """Accuracy vs shots, one line per method, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for r in records:
        curve = sorted(r.shots_curve().items())
        if curve:
            axis.plot([k for k, _ in curve], [100 * v for _, v in curve], marker="o", label=r.key)
    axis.set_xlabel("shots (5-way)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_xscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
