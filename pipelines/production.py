"""Stages `production_*` (always run): the production versions a consumer stage reads, as a file DVC can hash.

DVC cannot see an MLflow alias. Every stage that consumes `production` depends
on one of these files instead, and loads the versions the file names. Its
watcher runs on every `dvc repro` and rewrites the file; DVC compares content,
so a consumer reruns exactly when a version it reads was promoted or rolled
back (`metaflowlib promote`, `rollback`, or the alias moved in the MLflow UI).

    watcher                 file                            consumer
    production_shift@<m>    production/shift/<m>.json       shift@<m>
    production_optimizer    production/optimizer.json       optimizer_eval
    production_finetune     production/finetune.json        optimizer_finetune
    production_tta          production/tta.json             tta@<strategy>

Usage: python pipelines/production.py <shift <method> | optimizer | finetune | tta>
"""

from __future__ import annotations

import sys
from pathlib import Path

from _production import CONSUMERS, LEARNED, path, roles
from _stage import ROOT, params, run_guarded

from metaflowlib import registry, tracking
from metaflowlib.config import Params
from metaflowlib.config.learned_optimizer import LearnedOptimizerParams
from metaflowlib.config.shift import ShiftParams
from metaflowlib.config.tta import TTAParams
from metaflowlib.errors import RegistryError
from metaflowlib.io import write_json

READS = {"shift": {"shift": ShiftParams}, "optimizer": {"optimizer": LearnedOptimizerParams},
             "finetune": {"optimizer": LearnedOptimizerParams},
             "tta": {"tta": TTAParams, "optimizer": LearnedOptimizerParams}}  # consumer -> the params sections it reads

def registering_stage(p: Params, role: str) -> str:
    """The stage that registers the model playing `role`."""
    if role == LEARNED:
        return "optimizer_train"
    return p.registering_stage(role) if role in p.trained else "tta_source"


def resolve(p: Params, root: Path, consumer: str, key: str | None = None) -> dict[str, dict]:
    """Write `consumer`'s file from the aliases now; a missing alias says how to promote one."""
    tracking.configure(p.mlflow.tracking_uri)
    out = {}
    for role, name in roles(p, consumer, key).items():
        try:
            info = registry.require_production(name)
        except RegistryError as error:
            raise RegistryError(f"{error}; `dvc repro {registering_stage(p, role)}` registers one and promotes it when none "
                                "is in production") from None
        out[role] = {"name": info.name, "version": info.version, "run_id": info.run_id, "uri": f"models:/{info.name}/{info.version}"}
    write_json(root / path(consumer, key), out)
    return out


def main() -> None:
    consumer, key = (sys.argv[1:] + [None])[:2] if len(sys.argv) in (2, 3) else (None, None)
    if consumer not in CONSUMERS or (consumer == "shift") != (key is not None):
        raise SystemExit(f"usage: python {Path(sys.argv[0]).name} <shift <method> | optimizer | finetune | tta>")
    out = resolve(params(**READS[consumer]), ROOT, consumer, key)
    print(f"production {consumer}{'@' + key if key else ''}: " + ", ".join(f"{v['name']} v{v['version']}" for v in out.values()))


if __name__ == "__main__":
    run_guarded(main)
