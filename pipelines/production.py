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

from _stage import ROOT, declared, params, run_guarded

from metaflowlib import registry, tracking
from metaflowlib.config import Params
from metaflowlib.errors import ConfigError, DataError, RegistryError
from metaflowlib.io import read_json, write_json

LEARNED = "learned_optimizer"  # the role of the learned LSTM optimizer in a consumer's file
CONSUMERS = ("shift", "optimizer", "finetune", "tta")


def path(consumer: str, key: str | None = None) -> Path:
    """The file (relative to the project) recording what `consumer` reads."""
    return declared(f"production_{consumer}", "production/*", item=key or "")


def roles(p: Params, consumer: str, key: str | None = None) -> dict[str, str]:
    """Role -> registered model name, for each production version `consumer` reads."""
    learned = {LEARNED: p.registered_name(p.optimizer.name)}
    if consumer == "shift":
        if key not in p.shift.methods:
            raise ConfigError(f"'{key}' is not in shift.methods ({', '.join(p.shift.methods)})")
        return {key: p.registered_name(key)}
    if consumer == "optimizer":
        return learned
    if consumer == "finetune":
        return learned | {m: p.registered_name(m) for m in p.optimizer.finetune.methods}
    if consumer == "tta":
        strategies = p.tta.strategies.values()
        uses_learned = any(getattr(s, "optimizer", None) == "learned" for s in strategies)
        return {kind: p.tta.registered_name(kind) for kind in sorted({s.model for s in strategies})} | (learned if uses_learned else {})
    raise ConfigError(f"unknown production consumer {consumer!r} (one of {', '.join(CONSUMERS)})")


def registering_stage(p: Params, role: str) -> str:
    """The stage that registers the model playing `role`."""
    if role == LEARNED:
        return "optimizer_train"
    return f"register@{role}" if role in p.methods else "tta_source"


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


def recorded(p: Params, root: Path, consumer: str, key: str | None = None) -> dict[str, dict]:
    """What the watcher recorded for `consumer` (role -> name, version, run id, uri), checked against the aliases
    now: a consumer adapts exactly the versions DVC tracked, and refuses when production moved since."""
    expected, file = roles(p, consumer, key), path(consumer, key)
    if not (root / file).is_file():
        raise DataError(f"{root / file} is missing: run `dvc repro` (its production_* stage records the production versions)")
    references = read_json(root / file)
    for role, name in expected.items():
        reference = references.get(role)
        current = registry.require_production(name)
        if reference is None or reference["name"] != name or reference["version"] != current.version:
            named = f"{reference['name']} v{reference['version']}" if reference else f"no {role}"
            raise RegistryError(f"{file} names {named} but {name} production is v{current.version}: "
                                "run `dvc repro` so that its production_* stage records the current one")
    return references


def main() -> None:
    consumer, key = (sys.argv[1:] + [None])[:2] if len(sys.argv) in (2, 3) else (None, None)
    if consumer not in CONSUMERS or (consumer == "shift") != (key is not None):
        raise SystemExit(f"usage: python {Path(sys.argv[0]).name} <shift <method> | optimizer | finetune | tta>")
    out = resolve(params(), ROOT, consumer, key)
    print(f"production {consumer}{'@' + key if key else ''}: " + ", ".join(f"{v['name']} v{v['version']}" for v in out.values()))


if __name__ == "__main__":
    run_guarded(main)
