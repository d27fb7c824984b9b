"""Stage `report`: every method of params.yaml side by side, from their evaluation and training records.

Outputs: reports/summary.md (accuracy per setting, accuracy vs shots, costs, accuracy under shift),
reports/shots_curve.png. No MLflow writes: the numbers are already in each method's run.
"""

from __future__ import annotations

from _stage import ROOT, params, run_guarded

from metaflowlib.data.store import load_info
from metaflowlib.errors import DataError
from metaflowlib.io import atomic_path, read_json
from metaflowlib.report import MethodRecord, markdown, plot_shots_curves, shift_markdown
from metaflowlib.runtime import device_name, resolve_device


def main() -> None:
    p = params()
    records = []
    for key in p.methods:
        metrics_path, train_path = ROOT / "metrics" / key / "eval.json", ROOT / "runs" / key / "train.json"
        if not metrics_path.is_file() or not train_path.is_file():
            raise DataError(f"no results for method '{key}' ({metrics_path.relative_to(ROOT)}): run `dvc repro evaluate@{key}`")
        mp = p.method(key)
        records.append(MethodRecord(key, mp.kind, mp.model_config_dict(p.data.image_size), read_json(metrics_path), read_json(train_path)))
    device = resolve_device(p.device)
    info = load_info(ROOT / "data" / "prepared")
    page = markdown(records, list(p.evaluate.settings), p.profile, f"{p.data.name}, {device_name(device)}",
                    published=p.data.name == "omniglot-vinyals")
    page += f"\nTest split: {info['splits']['test']['classes']} classes; {p.evaluate.episodes} tasks per setting, seed {p.evaluate.seed}.\n"
    shifted = {key: read_json(path) for key in p.shift.methods if (path := ROOT / "metrics" / "shift" / f"{key}.json").is_file()}
    if shifted:
        page += shift_markdown(shifted)
    out = ROOT / "reports"
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(page)
    plot_shots_curves(records, out / "shots_curve.png")
    print(f"report: {len(records)} methods -> reports/summary.md, reports/shots_curve.png")


if __name__ == "__main__":
    run_guarded(main)
