"""The CLI's registry commands and the served few-shot model, from Python.

    from metaflowlib.api import load_production
    learner = load_production("omniglot-vinyals-protonet")        # the registered pyfunc model, no pickle
    classifier = learner.adapt(support_images, support_labels)      # one few-shot task
    classifier.predict(query_images), classifier.predict_proba(query_images)
    learner.predict_folders("support/", "query/", strategy="bn")    # support/<class>/<images>, query/**/<images>

Every answer comes from the registered pyfunc model's own `predict` (metaflowlib.serving: the
payload contract, adaptation to the support set, labels), so it is the answer `mlflow models
serve` gives for the same task; a malformed task raises the contract's one-line PayloadError.
The store is `tracking_uri`, else $MLFLOW_TRACKING_URI, else params' default
`sqlite:///mlflow.db`: the CLI's order, with the argument in place of `--tracking-uri`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metaflowlib import registry

if TYPE_CHECKING:  # it imports mlflow: at run time only inside _load
    from metaflowlib.serving.fewshot import FewShotModel

TRACKING_ENV = "MLFLOW_TRACKING_URI"


def use_store(tracking_uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at the store and return its URI; an unreachable one is a MetaflowError."""
    from metaflowlib import tracking
    from metaflowlib.config import MlflowParams

    if tracking_uri is None:
        return tracking.configure(MlflowParams().tracking_uri)
    saved = os.environ.get(TRACKING_ENV)
    os.environ[TRACKING_ENV] = tracking_uri  # configure lets the environment win over its argument, as the CLI flag does
    try:
        return tracking.configure(tracking_uri)
    finally:
        if saved is None:
            del os.environ[TRACKING_ENV]
        else:
            os.environ[TRACKING_ENV] = saved


class TaskClassifier:
    """One few-shot task: its support set, fixed; each predict call sends support + queries to the model.

    Images: uint8 [N, H, W] (grayscale) or [N, H, W, 3] (RGB) of any size, or a list of such images of
    different sizes (fitted to the model's format here); labels: integers 0..N-1 or class names, which
    `predict` then answers with (`classes`: the class of each probability column, names sorted).
    The served model adapts omega to the support set per request (theta_i) under `strategy`
    (source, bn, tent), and the MAML family's transductive BatchNorm uses the query batch, so queries
    predicted together get exactly the served answer. Construction checks the task with one predict
    call on the support images: a support set the model refuses (malformed, or N classes its
    fixed N-way head does not have) fails here, with the contract's PayloadError.
    """

    def __init__(self, model: FewShotModel, support_images: Any, support_labels: Any, strategy: str = "source") -> None:
        self._model, self.strategy = model, strategy
        self.support_images = _images(model, support_images, "support_images")
        self.support_labels = np.ascontiguousarray(support_labels)
        self.classes = self._answer(self.support_images)["classes"]
        self.ways = len(self.classes)

    def _answer(self, query_images: Any) -> dict[str, np.ndarray]:
        payload = {"support_images": self.support_images, "support_labels": self.support_labels,
                   "query_images": _images(self._model, query_images, "query_images")}
        return self._model.predict(None, payload, {"strategy": self.strategy})

    def predict(self, query_images: Any) -> np.ndarray:
        """The class of each query: [Q], of the support labels' kind (int64 0..ways-1, or names)."""
        return self._answer(query_images)["labels"]

    def predict_proba(self, query_images: Any) -> np.ndarray:
        """Class probabilities of the queries: float32 [Q, ways], columns in the order of `classes`."""
        return self._answer(query_images)["probabilities"]


def _images(model: FewShotModel, values: Any, name: str) -> np.ndarray:
    """As an array in C order (torch refuses a reversed or strided numpy view); a list of images of different
    sizes or layouts is fitted to the model's format first. The contract checks the rest."""
    from metaflowlib.data.preprocess import fit_images
    from metaflowlib.errors import PayloadError

    if isinstance(values, (list, tuple)) and len({np.shape(v) for v in values}) > 1:
        try:
            return fit_images(values, model.format)
        except ValueError as error:
            raise PayloadError(f"{name}: {error}") from None
    return np.ascontiguousarray(values)


class FewShotLearner:
    """A registered version of a few-shot model: omega, ready to adapt to any task with its number of classes."""

    def __init__(self, model: FewShotModel, version: registry.VersionInfo) -> None:
        self._model, self.version = model, version

    def adapt(self, support_images: Any, support_labels: Any, strategy: str = "source") -> TaskClassifier:
        """A classifier for the task of this support set (see TaskClassifier), adapting under `strategy`."""
        return TaskClassifier(self._model, support_images, support_labels, strategy)

    def predict_folders(self, support_dir: str | Path, query_dir: str | Path, strategy: str = "source") -> list[dict[str, Any]]:
        """Label every image under `query_dir` with the task of `support_dir` (one subfolder per class, named by
        it): [{file, class, probability, probabilities: {class: p}}] in file order. A folder that cannot make a
        task is a DataError naming it (metaflowlib.serving.folders)."""
        from metaflowlib.data.preprocess import fit_images
        from metaflowlib.serving.folders import read_query, read_support

        fmt = self._model.format
        support, names = read_support(support_dir, fmt.channels)
        files, query = read_query(query_dir, fmt.channels)
        payload = {"support_images": fit_images(support, fmt), "support_labels": np.array(names),
                   "query_images": fit_images(query, fmt)}
        answer = self._model.predict(None, payload, {"strategy": strategy})
        classes = [str(c) for c in answer["classes"]]
        return [{"file": str(path), "class": str(label), "probability": float(p.max()),
                 "probabilities": dict(zip(classes, (float(v) for v in p), strict=True))}
                for path, label, p in zip(files, answer["labels"], answer["probabilities"], strict=True)]


def load_production(name: str, tracking_uri: str | None = None) -> FewShotLearner:
    """The production version of the few-shot model `name` (e.g. 'omniglot-vinyals-protonet')."""
    use_store(tracking_uri)
    return _load(registry.require_production(name))


def load_version(name: str, version: str | int, tracking_uri: str | None = None) -> FewShotLearner:
    """A version of the few-shot model `name` by number, or by alias as '@alias'."""
    use_store(tracking_uri)
    return _load(registry.get_version(name, version))


def _load(info: registry.VersionInfo) -> FewShotLearner:
    """The pyfunc model of that version number (not the alias, which may move meanwhile), if it is a few-shot one."""
    from metaflowlib.serving.fewshot import FewShotModel
    from metaflowlib.serving.log import unwrap_registered

    return FewShotLearner(unwrap_registered(f"models:/{info.name}/{info.version}", FewShotModel), info)


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """`metaflowlib models list`: every registered model with its versions (registry.VersionInfo), aliases and tags."""
    use_store(tracking_uri)
    return registry.list_models()


def show(name: str, version: str | int | None = None, tracking_uri: str | None = None) -> registry.VersionInfo:
    """`metaflowlib models show`: a version by number or '@alias' (default: production)."""
    use_store(tracking_uri)
    return registry.get_version(name, version if version is not None else f"@{registry.ALIAS}")


def evaluations(name: str, version: str | int | None = None, tracking_uri: str | None = None) -> list[registry.Evaluation]:
    """The runs that evaluated a version (the 'evaluated by' part of `models show`)."""
    return registry.evaluations(show(name, version, tracking_uri))


def promote(name: str, version: str | int, gate_metric: str | None = None, force: bool = False,
            tracking_uri: str | None = None, confidence: float | None = None) -> str:
    """`metaflowlib promote`: move production behind the gate (defaults: params' registry.gate_metric and
    registry.confidence defaults)."""
    from metaflowlib.config import RegistryParams

    use_store(tracking_uri)
    defaults = RegistryParams()
    return registry.promote(name, version, gate_metric or defaults.gate_metric, force=force,
                            confidence=confidence or defaults.confidence)


def rollback(name: str, tracking_uri: str | None = None) -> str:
    """`metaflowlib rollback`: production back to the version it replaced."""
    use_store(tracking_uri)
    return registry.rollback(name)


__all__ = ["FewShotLearner", "TaskClassifier", "evaluations", "list_models", "load_production", "load_version", "promote",
           "rollback", "show", "use_store"]
