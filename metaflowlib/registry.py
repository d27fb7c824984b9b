"""The registry of meta-knowledge: register, list, promote behind the evaluation gate, roll back, load.

The alias `production` moves only when the candidate's recorded evaluation
beats the current production version on the same protocol (or `force`), and
only after the candidate's artifacts load and answer a predict call. The
previous production versions are kept in the registered model's
`production_history` tag, so `rollback` is one command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from metaflowlib.errors import RegistryError

ALIAS = "production"
HISTORY_TAG = "production_history"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    tags: dict[str, str]
    description: str

    def metric(self, key: str) -> float | None:
        value = self.tags.get(key)
        return float(value) if value is not None else None


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _info(version) -> VersionInfo:
    return VersionInfo(version.name, str(version.version), version.run_id, list(version.aliases or []), dict(version.tags or {}), version.description or "")


def _require_model(name: str):
    """The client, once `name` is known to be registered."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r} (see `metaflowlib models list`)") from None
    return client


def get_version(name: str, version: str | int) -> VersionInfo:
    from mlflow.exceptions import MlflowException

    client = _require_model(name)
    try:
        return _info(client.get_model_version(name, str(version)))
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version}") from None


def get_alias(name: str, alias: str = ALIAS) -> VersionInfo | None:
    from mlflow.exceptions import MlflowException

    client = _require_model(name)
    try:
        return _info(client.get_model_version_by_alias(name, alias))
    except MlflowException:
        return None


def register(model_uri: str, name: str, tags: dict[str, Any], description: str, model_description: str) -> VersionInfo:
    """Create a version of `name` from a logged model (its run comes with it), with its evaluation numbers as tags."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=model_description)
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.update_model_version(name, version.version, description=description)
    client.update_registered_model(name, description=model_description)
    return get_version(name, version.version)


def list_models() -> list[dict[str, Any]]:
    """Every registered model with its versions, aliases and gate metrics."""
    client = _client()
    out = []
    for model in client.search_registered_models():
        versions = sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version))
        aliases = model.aliases or {}
        infos = []
        for v in versions:
            info = _info(v)
            named = sorted(a for a, number in aliases.items() if str(number) == info.version)
            infos.append(VersionInfo(info.name, info.version, info.run_id, named, info.tags, info.description))
        out.append({"name": model.name, "description": model.description or "", "versions": infos})
    return out


def smoke_test(name: str, version: str) -> None:
    """Load the version through pyfunc and answer its stored input example; raise if anything fails."""
    import mlflow.pyfunc

    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        example = model.input_example
        if not isinstance(example, dict):
            raise ValueError("the model has no stored input example task")
        labels = np.asarray(model.predict(example)["labels"])
        if labels.shape != (len(example["query_images"]),):
            raise ValueError(f"predict returned labels of shape {labels.shape}")
    except Exception as error:  # any failure to load or answer means the version must not serve
        raise RegistryError(f"{name} version {version} failed its load check, production not moved: {error}") from None


def _history(name: str) -> list[str]:
    tags = _client().get_registered_model(name).tags or {}
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def promote(name: str, version: str | int, gate_metric: str, force: bool = False) -> str:
    """Move `production` to `version` if it beats the current one on `gate_metric`; returns what was done."""
    candidate = get_version(name, version)
    current = get_alias(name)
    if current is not None and current.version == candidate.version:
        return f"{name} version {candidate.version} is already {ALIAS}"
    new_value = candidate.metric(gate_metric)
    if current is not None and not force:
        if candidate.tags.get("protocol") != current.tags.get("protocol"):
            raise RegistryError(
                f"refusing to promote {name} v{candidate.version}: protocol {candidate.tags.get('protocol')!r} "
                f"differs from production v{current.version}'s {current.tags.get('protocol')!r} (use --force)"
            )
        old_value = current.metric(gate_metric)
        if new_value is None or (old_value is not None and new_value <= old_value):
            raise RegistryError(
                f"refusing to promote {name} v{candidate.version}: {gate_metric} {_fmt(new_value)} does not beat "
                f"production v{current.version}'s {_fmt(old_value)} (use --force to override)"
            )
    smoke_test(name, candidate.version)
    client = _client()
    if current is not None:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(_history(name) + [current.version]))
    client.set_registered_model_alias(name, ALIAS, candidate.version)
    before = f"v{current.version} ({gate_metric} {_fmt(current.metric(gate_metric))})" if current else "none"
    forced = " (forced)" if force and current is not None else ""
    return f"promoted {name} v{candidate.version} ({gate_metric} {_fmt(new_value)}) to {ALIAS}{forced}; previous: {before}"


def rollback(name: str) -> str:
    """Point `production` back at the version it replaced last."""
    history = _history(name)
    current = get_alias(name)
    if not history:
        raise RegistryError(f"{name} has no previous {ALIAS} version to roll back to")
    previous = history.pop()
    get_version(name, previous)
    smoke_test(name, previous)
    client = _client()
    client.set_registered_model_alias(name, ALIAS, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return f"rolled {name} {ALIAS} back from v{current.version if current else '?'} to v{previous}"


def load_production(name: str):
    """The production pyfunc model of `name`; a clear message if none is promoted."""
    import mlflow.pyfunc

    if get_alias(name) is None:
        raise RegistryError(
            f"{name} has no '{ALIAS}' version; promote one with `metaflowlib promote {name} <version>`"
        )
    return mlflow.pyfunc.load_model(f"models:/{name}@{ALIAS}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
