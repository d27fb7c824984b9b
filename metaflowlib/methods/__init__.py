"""Method registry: `kind` -> class, found in this package's modules. A new method is one file here (a
`MetaLearner` subclass with a `kind`) plus a `methods:` block in params.yaml: nothing else names it."""

from __future__ import annotations

import importlib
import pkgutil

from metaflowlib.methods.base import MetaLearner, StepStats
from metaflowlib.methods.imaml import IMAML
from metaflowlib.methods.maml import FOMAML, MAML
from metaflowlib.methods.param_prediction import ParameterPredictor
from metaflowlib.methods.protonet import ProtoNet
from metaflowlib.methods.reptile import Reptile


def _discover() -> dict[str, type[MetaLearner]]:
    """Every subclass of MetaLearner that declares its own `kind`, after importing each module of the package."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, todo = {}, [MetaLearner]
    while todo:
        for cls in todo.pop().__subclasses__():
            if "kind" in cls.__dict__:
                if cls.kind in found and found[cls.kind] is not cls:
                    raise TypeError(f"method kind {cls.kind!r} is declared by {found[cls.kind].__qualname__} and {cls.__qualname__}")
                found[cls.kind] = cls
            todo.append(cls)
    return dict(sorted(found.items()))


METHODS: dict[str, type[MetaLearner]] = _discover()


def build_method(kind: str, **config) -> MetaLearner:
    """Instantiate a method by its registry key."""
    try:
        cls = METHODS[kind]
    except KeyError:
        raise KeyError(f"unknown method kind {kind!r}; known: {sorted(METHODS)}") from None
    return cls(**config)


__all__ = ["FOMAML", "IMAML", "MAML", "METHODS", "MetaLearner", "ParameterPredictor", "ProtoNet", "Reptile", "StepStats", "build_method"]
