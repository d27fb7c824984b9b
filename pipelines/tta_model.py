"""Stage `tta_model` (always runs): which registered versions are in production now.

Output: registry/tta_production.json ({model: {name, version, run_id, uri}}
for the source classifier, its TTT twin and, when a strategy uses it, the
learned optimizer). DVC cannot see an MLflow alias,
so this cheap stage turns it into a file; the `tta@<strategy>` stages depend
on that file and rerun only when its content changes, i.e. when a person
promotes (or rolls back) another version.
"""

from __future__ import annotations

from pathlib import Path

from _stage import ROOT, params, run_guarded

from metaflowlib import registry, tracking
from metaflowlib.config import Params
from metaflowlib.io import write_json
from metaflowlib.tta.classifier import KINDS

PRODUCTION = Path("registry") / "tta_production.json"
LEARNED = "learned_optimizer"


def resolve(p: Params, root: Path) -> dict:
    """The production version of each classifier; a missing alias says how to promote one."""
    tracking.configure(p.mlflow.tracking_uri)
    out = {}
    names = {model: p.tta.registered_name(model) for model in KINDS}
    if any(getattr(strategy, "optimizer", None) == "learned" for strategy in p.tta.strategies.values()):
        names[LEARNED] = p.registered_name(p.optimizer.name)  # the update rule of a `learned` strategy
    for model, name in names.items():
        info = registry.require_production(name)
        out[model] = {"name": info.name, "version": info.version, "run_id": info.run_id,
                      "uri": f"models:/{info.name}/{info.version}"}
    write_json(root / PRODUCTION, out)
    return out


def main() -> None:
    out = resolve(params(), ROOT)
    print("tta_model: production " + ", ".join(f"{v['name']} v{v['version']}" for v in out.values()))


if __name__ == "__main__":
    run_guarded(main)
