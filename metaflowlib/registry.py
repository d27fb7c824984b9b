"""The registry of meta-knowledge: register, list, promote behind the evaluation gate, roll back, load.

The alias `production` moves only when the candidate beats the current
production version on the same protocol by the gate's paired test
(`metaflowlib.gate`; or `force`), and only after the candidate's artifacts
load and answer a predict call. The
previous production versions are kept in the registered model's
`production_history` tag, so `rollback` is one command.

Promote and rollback read production, check, then write the history tag and
the alias: on a local SQLite store they hold a file lock next to the
database, so two at once run one after the other (the second sees the
first's result). Other stores get a re-check of production just before the
write, which narrows the race but cannot close it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metaflowlib.errors import RegistryError
from metaflowlib.io import file_lock

ALIAS = "production"
HISTORY_TAG = "production_history"
GATE_TAG = "gate_metric"  # a version tag naming the metric that version is gated on, when not the params' one
DEFAULT_CONFIDENCE = 0.95  # params registry.confidence: the promotion gate's interval
LOCK_SECONDS = 300.0  # a promote's load check takes seconds; a lock held longer means something is stuck


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
    """A version by number, or by alias as `@alias`; an unknown or deleted one names what exists."""
    from mlflow.exceptions import MlflowException

    client = _require_model(name)
    reference = str(version)
    try:
        if reference.startswith("@"):
            return _info(client.get_model_version_by_alias(name, reference[1:]))
        return _info(client.get_model_version(name, reference))
    except MlflowException:
        model = client.get_registered_model(name)
        if reference.startswith("@"):
            raise RegistryError(f"registered model {name!r} has no alias {reference[1:]!r} (aliases: {sorted(model.aliases or {})})") from None
        numbers = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise RegistryError(f"registered model {name!r} has no version {reference} (never registered, or deleted; versions: {numbers})") from None


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
        client.create_registered_model(name, description=model_description)
    except MlflowException as error:  # registered before, or by a concurrent run a moment ago
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.update_model_version(name, version.version, description=description)
    client.update_registered_model(name, description=model_description)
    return get_version(name, version.version)


def register_stage_version(model_uri: str, name: str, tags: dict[str, Any], description: str, model_description: str,
                           gate_metric: str, promote_first: bool) -> tuple[VersionInfo, str | None]:
    """The one way a stage registers what it trained: a new version, promoted when `promote_first` (params
    registry.promote_first) and no version of `name` is in production yet; returns it and what promotion said."""
    version = register(model_uri, name, tags, description, model_description)
    return version, promote_if_none(name, version.version, gate_metric) if promote_first else None


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


def headline(version: VersionInfo, gate_metric: str) -> tuple[str, float] | None:
    """The number `models list` shows for a version: the metric it is gated on (`gate_metric_of`: a few-shot
    setting, a classifier's clean accuracy, a learned optimizer's validation loss drop); for a version registered
    without one (a pre-trained feature map), the first accuracy among its tags; None when it records neither."""
    metric = gate_metric_of(version, gate_metric)
    value = version.metric(metric)
    if value is not None:
        return metric, value
    for key in sorted(k for k in version.tags if k.startswith("acc_") or "accuracy" in k):
        try:
            return key, float(version.tags[key])
        except ValueError:
            continue
    return None


# A run that evaluates a registered version names it in a pair of tags; `evaluations` finds those runs and keeps
# the metrics that summarize each (pattern, full match; the rest stay in the run).
EVALUATED_BY: dict[tuple[str, str], str] = {
    ("model_name", "model_version"): r"error_clean|mean_error_all|mean_error_s\d+",  # tta@<strategy>, Fashion-MNIST-C
    ("adapted_model", "adapted_version"): r"(?!acc_)\w+_(clean|mean_corrupted)",  # shift@<method>, Omniglot-C
    ("evaluated_model", "evaluated_version"): r"(seen|unseen)/(learned|adam_tuned)/\d+x/train_loss_mean",  # optimizer_eval
    ("optimizer_model", "optimizer_version"): r"acc_\w+",  # optimizer_finetune: MAML-family fine-tuning, SGD vs learned
}


@dataclass(frozen=True)
class Evaluation:
    run_name: str
    run_id: str
    metrics: dict[str, float]


def evaluations(version: VersionInfo) -> list[Evaluation]:
    """The latest finished run of each stage that evaluated `version` (by run name), with its summary metrics."""
    client = _client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    latest: dict[str, Evaluation] = {}
    for (name_tag, version_tag), pattern in EVALUATED_BY.items():
        query = (f"tags.{name_tag} = '{version.name}' and tags.{version_tag} = '{version.version}' "
                 "and attributes.status = 'FINISHED'")
        for run in client.search_runs(experiments, query, order_by=["attributes.start_time DESC"]):
            metrics = {k: run.data.metrics[k] for k in sorted(run.data.metrics, key=_natural) if re.fullmatch(pattern, k)}
            latest.setdefault(run.info.run_name, Evaluation(run.info.run_name, run.info.run_id, metrics))
    return sorted(latest.values(), key=lambda e: e.run_name)


def _natural(key: str) -> list[int | str]:
    """Sort key that puts '5x' before '10x'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


# input key of a stored example -> (output key, the shape that output must have): a few-shot model labels a
# task's queries, a classifier (metaflowlib.tta) a batch of images, a learned optimizer (metaflowlib.learned_optimizer)
# answers a gradient sequence with one update per coordinate and step
SMOKE_CONTRACTS = {
    "query_images": ("labels", lambda x: (len(x),)),
    "images": ("labels", lambda x: (len(x),)),
    "gradients": ("updates", lambda x: x.shape),
}


def smoke_test(name: str, version: str) -> None:
    """Load the version through pyfunc and answer its stored input example; raise if anything fails."""
    from metaflowlib.serving.log import load_pyfunc

    try:
        model = load_pyfunc(f"models:/{name}/{version}")
        example = model.input_example
        if not isinstance(example, dict):
            raise TypeError("the model has no stored input example task")
        key = next((k for k in SMOKE_CONTRACTS if k in example), None)
        if key is None:
            raise ValueError(f"the stored input example has none of {', '.join(SMOKE_CONTRACTS)}")
        output, expected_shape = SMOKE_CONTRACTS[key]
        answer = np.asarray(model.predict(example)[output])
        if answer.shape != expected_shape(np.asarray(example[key])):
            raise ValueError(f"predict returned {output} of shape {answer.shape}")
    except Exception as error:  # noqa: BLE001 - any failure to load or answer means the version must not serve
        raise RegistryError(f"{name} version {version} failed its load check, production not moved: {error}") from None


def _history(name: str) -> list[str]:
    tags = _client().get_registered_model(name).tags or {}
    return json.loads(tags.get(HISTORY_TAG, "[]"))


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """Serialize promote/rollback on a local SQLite store (a lock file beside the database); elsewhere a no-op."""
    import mlflow

    uri = mlflow.get_registry_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
    lock = database.with_name(database.name + ".registry.lock")
    try:
        with file_lock(lock, LOCK_SECONDS):
            yield
    except TimeoutError:
        raise RegistryError(f"another promote or rollback has held {lock} for over {LOCK_SECONDS:.0f}s; production not moved") from None


def _move_production(name: str, expected: VersionInfo | None, version: str, history: list[str]) -> None:
    """Point the alias at `version` and store `history`, if production is still `expected` (a concurrent change
    on a store without a lock is refused, not overwritten). A history that grows is written before the alias,
    one that shrinks after it: a crash between the two never loses the way back, at worst a rollback is a no-op."""
    now = get_alias(name)
    if (now.version if now else None) != (expected.version if expected else None):
        raise RegistryError(f"{name} {ALIAS} moved to v{now.version if now else 'none'} while this command ran; production not moved, run it again")
    client = _client()
    grows = len(history) > len(_history(name))
    if grows:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, ALIAS, version)
    if not grows:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def promote(name: str, version: str | int, gate_metric: str, force: bool = False, confidence: float = DEFAULT_CONFIDENCE) -> str:
    """Move `production` to `version` if the gate (metaflowlib.gate) says it beats the current one on `gate_metric`;
    returns what was done."""
    with _exclusive():
        return _promote(name, version, gate_metric, force, confidence)


def _promote(name: str, version: str | int, gate_metric: str, force: bool, confidence: float = DEFAULT_CONFIDENCE) -> str:
    from metaflowlib import gate

    candidate = get_version(name, version)
    gate_metric = gate_metric_of(candidate, gate_metric)
    current = get_alias(name)
    if current is not None and current.version == candidate.version:
        return f"{name} version {candidate.version} is already {ALIAS}"
    decision = None
    if current is not None:
        if not force and candidate.tags.get("protocol") != current.tags.get("protocol"):
            raise RegistryError(
                f"refusing to promote {name} v{candidate.version}: protocol {candidate.tags.get('protocol')!r} "
                f"differs from production v{current.version}'s {current.tags.get('protocol')!r} (use --force)"
            )
        try:
            decision = gate.decide(*(gate.evidence(v.version, v.run_id, v.tags.get(gate.EVALUATION_RUN_TAG), gate_metric)
                                     for v in (candidate, current)), gate_metric, confidence)
        except RegistryError as error:
            if not force:
                raise RegistryError(f"refusing to promote {name} v{candidate.version}: {error} (use --force to override)") from None
            decision = gate.Decision(False, f"gate not applied: {error}")
        if not decision.better and not force:
            raise RegistryError(f"refusing to promote {name} v{candidate.version}: {decision.message} (use --force to override)")
    smoke_test(name, candidate.version)
    _move_production(name, current, candidate.version, _history(name) + ([current.version] if current else []))
    if decision is None:
        return f"promoted {name} v{candidate.version} to {ALIAS}; there was no production version"
    forced = " (forced)" if force and not decision.better else ""
    return f"promoted {name} v{candidate.version} to {ALIAS}{forced}; {decision.message}"


def promote_if_none(name: str, version: str | int, gate_metric: str) -> str | None:
    """Promote `version` when `name` has no production version yet (checked under the same lock as
    promote, so two pipelines registering at once promote one version); None when one already exists."""
    with _exclusive():
        if get_alias(name) is not None:
            return None
        return _promote(name, version, gate_metric, force=False)


def rollback(name: str) -> str:
    """Point `production` back at the version it replaced last."""
    with _exclusive():
        return _rollback(name)


def _rollback(name: str) -> str:
    current = get_alias(name)  # first: it names an unknown model
    history = _history(name)
    if not history:
        raise RegistryError(f"{name} has no previous {ALIAS} version to roll back to")
    previous = history.pop()
    try:
        get_version(name, previous)
    except RegistryError as error:
        raise RegistryError(f"cannot roll {name} back to v{previous}, the version production replaced: {error}") from None
    smoke_test(name, previous)
    _move_production(name, current, previous, history)
    return f"rolled {name} {ALIAS} back from v{current.version if current else '?'} to v{previous}"


def gate_metric_of(version: VersionInfo, requested: str) -> str:
    """`requested` where the version records it; else the metric its `gate_metric` tag names (a TTA
    classifier is gated on clean accuracy, not on a few-shot setting); else `requested`."""
    return requested if requested in version.tags else version.tags.get(GATE_TAG, requested)


def require_production(name: str) -> VersionInfo:
    """The production version of `name`; a message saying how to promote one if there is none."""
    current = get_alias(name)
    if current is None:
        raise RegistryError(
            f"{name} has no '{ALIAS}' version; promote one with `metaflowlib promote {name} <version>`"
        )
    return current


def load_production(name: str):
    """The production pyfunc model of `name`; a clear message if none is promoted."""
    from metaflowlib.serving.log import load_pyfunc

    require_production(name)
    return load_pyfunc(f"models:/{name}@{ALIAS}")

