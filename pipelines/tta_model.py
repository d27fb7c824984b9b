"""Stage `tta_model` (always runs): which registered versions are in production now.

Output: registry/tta_production.json ({model: {name, version, run_id, uri}}
for the source classifier and its TTT twin). DVC cannot see an MLflow alias,
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


def resolve(p: Params, root: Path) -> dict:
    """The production version of each classifier; a missing alias says how to promote one."""
    tracking.configure(p.mlflow.tracking_uri)
    out = {}
    for model in KINDS:
        info = registry.require_production(p.tta.registered_name(model))
        out[model] = {"name": info.name, "version": info.version, "run_id": info.run_id,
                      "uri": f"models:/{info.name}/{info.version}"}
    write_json(root / PRODUCTION, out)
    return out


def main() -> None:
    out = resolve(params(), ROOT)
    print("tta_model: production " + ", ".join(f"{v['name']} v{v['version']}" for v in out.values()))


if __name__ == "__main__":
    run_guarded(main)
