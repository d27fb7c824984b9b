"""Method registry: `kind` -> class. A new method is one file plus one entry here."""

from __future__ import annotations

from metaflowlib.methods.base import MetaLearner, StepStats
from metaflowlib.methods.imaml import IMAML
from metaflowlib.methods.maml import FOMAML, MAML
from metaflowlib.methods.param_prediction import ParameterPredictor
from metaflowlib.methods.protonet import ProtoNet
from metaflowlib.methods.reptile import Reptile

METHODS: dict[str, type[MetaLearner]] = {cls.kind: cls for cls in (ProtoNet, MAML, FOMAML, Reptile, IMAML, ParameterPredictor)}


def build_method(kind: str, **config) -> MetaLearner:
    """Instantiate a method by its registry key."""
    try:
        cls = METHODS[kind]
    except KeyError:
        raise KeyError(f"unknown method kind {kind!r}; known: {sorted(METHODS)}") from None
    return cls(**config)


__all__ = ["FOMAML", "IMAML", "MAML", "METHODS", "MetaLearner", "ParameterPredictor", "ProtoNet", "Reptile", "StepStats", "build_method"]
