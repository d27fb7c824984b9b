"""What a consumer of `production` reads: the file its `production_*` watcher wrote (pipelines/production.py),
checked against the registry's aliases now. Consumers load only their own params section, so this file
imports none."""

from __future__ import annotations

from pathlib import Path

from _stage import declared

from metaflowlib import registry
from metaflowlib.config import Params
from metaflowlib.errors import ConfigError, DataError, RegistryError
from metaflowlib.io import read_json

LEARNED = "learned_optimizer"  # the role of the learned LSTM optimizer in a consumer's file
CONSUMERS = ("shift", "optimizer", "finetune", "tta")


def path(consumer: str, key: str | None = None) -> Path:
    """The file (relative to the project) recording what `consumer` reads."""
    return declared(f"production_{consumer}", "production/*", item=key or "")


def roles(p: Params, consumer: str, key: str | None = None) -> dict[str, str]:
    """Role -> registered model name, for each production version `consumer` reads."""
    def learned() -> dict[str, str]:
        return {LEARNED: p.registered_name(p.optimizer.name)}

    if consumer == "shift":
        if key not in p.shift.methods:
            raise ConfigError(f"'{key}' is not in shift.methods ({', '.join(p.shift.methods)})")
        return {key: p.registered_name(key)}
    if consumer == "optimizer":
        return learned()
    if consumer == "finetune":
        return learned() | {m: p.registered_name(m) for m in p.optimizer.finetune.methods}
    if consumer == "tta":
        strategies = p.tta.strategies.values()
        uses_learned = any(getattr(s, "optimizer", None) == "learned" for s in strategies)
        return {kind: p.tta.registered_name(kind) for kind in sorted({s.model for s in strategies})} | (learned() if uses_learned else {})
    raise ConfigError(f"unknown production consumer {consumer!r} (one of {', '.join(CONSUMERS)})")


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
