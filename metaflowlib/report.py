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


def markdown(records: list[MethodRecord], settings: list[str], profile: str, device: str, published: bool = False) -> str:
    """The report page: three tables; with `published`, each method's published figures under its row."""
    lines = [f"# Methods side by side (profile `{profile}`, {device})", "",
             ("Accuracy (%) ± 95% CI on the same fixed test tasks for every method; — = not scored "
             "(a fixed N-way head is scored on N-way tasks only)."), "",
             "| method | variant | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    for r in records:
        cells = [_pct(r.metrics.get(f"acc_{s}"), r.metrics.get(f"ci95_{s}")) for s in settings]
        lines.append(f"| {r.key} ({r.kind}) | {variant(r)} | " + " | ".join(cells) + " |")
        if published and r.kind in PUBLISHED:
            source, numbers = PUBLISHED[r.kind]
            cells = [f"{numbers[s]:.2f}" if s in numbers else "—" for s in settings]
            lines.append(f"| ↳ published | {source}, to convergence on a GPU | " + " | ".join(cells) + " |")
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


def shift_markdown(reports: dict[str, dict[str, Any]]) -> str:
    """Few-shot learners under shift: clean vs corrupted accuracy per test-time strategy."""
    first = next(iter(reports.values()))
    lines = ["", f"## Under shift (Omniglot-C, severity {first['severity']}, {first['setting']}, {first['tasks']} tasks per corruption)", "",
             "Accuracy (%) of each production model, clean and averaged over the corruptions; worst = the corruption "
             "it handles worst. `source` of a MAML-family model already fine-tunes on each task's support set.", "",
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4))
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
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
