"""Stage `tta_report`: every strategy side by side, as in the TENT paper's Table 2.

Reads metrics/tta/strategies/ and runs/tta/strategies/ for the strategies in
params. Outputs: metrics/tta/report.json (DVC metrics), report.md (the
tables), report.png (error vs severity; error per corruption at severity 5).
"""

from __future__ import annotations

from pathlib import Path

from _stage import ROOT, declared, params, run_guarded

from metaflowlib.config import Params
from metaflowlib.config.tta import TTAParams
from metaflowlib.errors import DataError
from metaflowlib.io import atomic_path, read_json, write_json
from metaflowlib.report.tta import build_report, markdown, plot

METRICS, RUNS = declared("tta_report", "metrics/*/strategies"), declared("tta_report", "runs/*/strategies")
REPORT = declared("tta_report", "*/report.json").parent


def report(p: Params, root: Path) -> dict:
    missing = [k for k in p.tta.strategies if not (root / METRICS / f"{k}.json").is_file()]
    if missing:
        raise DataError(f"no results for strategies {missing} in {METRICS}: run `dvc repro tta_report` (it runs tta@<strategy>)")
    metrics = {k: read_json(root / METRICS / f"{k}.json") for k in p.tta.strategies}
    runs = {k: read_json(root / RUNS / f"{k}.json") for k in p.tta.strategies}
    out = build_report(metrics, runs)
    write_json(root / REPORT / "report.json", out)
    with atomic_path(root / REPORT / "report.md") as tmp:
        tmp.write_text(markdown(out, runs))
    plot(out, root / REPORT / "report.png")
    return out


def main() -> None:
    out = report(params(tta=TTAParams), ROOT)
    at = out["error_at_severity"]
    ranking = " < ".join(f"{k} {100 * at[k]['mean']:.1f}%" for k in sorted(at, key=lambda k: at[k]["mean"]))
    print(f"tta_report: severity {out['severity']} mean error {ranking}; {REPORT}/report.md")


if __name__ == "__main__":
    run_guarded(main)
