"""params.yaml, parsed into typed, validated objects, section by section.

`Params` holds the sections every stage reads (data, methods' shared fields, train, evaluate, mlflow, registry).
The sections of one experiment (`tta`, `shift`, `optimizer`) are validated by the stages that read them, which
name the section's model: `load_params(path, tta=TTAParams)`. So a stage's code depends only on the registries it
uses (`config.tta` reads the strategy names from `metaflowlib.tta.strategies`), and a change to one experiment's
code never reruns another's stages. A method block's own arguments are checked against its class by
`config.methods.method_spec`; `metaflowlib check` checks everything (`config.check.check_params`).

Every section forbids unknown keys; a bad value fails before any work, with one message that lists each offending
field, its value and why.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from metaflowlib.config.base import Key, Strict, check_task_shape, settings_of, validate
from metaflowlib.config.common import (
    DataParams,
    EvaluateParams,
    MethodBlock,
    MlflowParams,
    PaperRunParams,
    RegistryParams,
    ServingParams,
    TrainParams,
)
from metaflowlib.errors import ConfigError
from metaflowlib.io import read_mapping

SECTIONS = ("tta", "shift", "optimizer")  # validated by the stages that read them


class Unloaded:
    """A section its stage did not ask for: reading it is a bug in the stage, said plainly."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        raise ConfigError(f"params section '{self.name}' was not loaded: pass its model to load_params "
                          f"(e.g. load_params(path, {self.name}=...))")


class Params(Strict):
    profile: Literal["default", "full"] = "default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams = DataParams()
    methods: dict[Key, MethodBlock] = Field(min_length=1)
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingParams = ServingParams()
    paper_runs: dict[Key, PaperRunParams] = {}  # key -> a finished GPU run (bench/paper_run.py) that import@<key> brings in
    tta: Any = None
    shift: Any = None
    optimizer: Any = None

    @model_validator(mode="after")
    def _tasks_can_be_sampled(self) -> Params:
        """Validation and evaluation task shapes the data cannot supply (a method's own: `config.methods`)."""
        v = self.train.validation
        check_task_shape(self.data, "train.validation", v.ways, v.shots + v.queries, "val")
        for setting, (ways, shots) in self.settings().items():
            check_task_shape(self.data, f"evaluate.settings[{setting}]", ways, shots + self.evaluate.queries, "test")
        return self

    @model_validator(mode="after")
    def _paper_runs_have_their_own_keys(self) -> Params:
        """An imported run is registered as `<prefix>-<key>`, like a method: the two kinds of key must differ."""
        shared = sorted(set(self.paper_runs) & set(self.methods))
        if shared:
            raise ValueError(f"paper_runs {shared} are also keys of methods: an imported run needs a key of its own")
        return self

    @property
    def trained(self) -> list[str]:
        """Every key with a registered omega: the methods trained here, then the imported paper runs."""
        return [*self.methods, *self.paper_runs]

    def registering_stage(self, key: str) -> str:
        return f"register_import@{key}" if key in self.paper_runs else f"register@{key}"

    def settings(self) -> dict[str, tuple[int, int]]:
        """'5w1s' -> (5, 1) for each evaluation setting."""
        return {setting: settings_of(setting) for setting in self.evaluate.settings}

    settings_of = staticmethod(settings_of)

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.data.name

    def registered_name(self, key: str) -> str:
        return f"{self.registry.model_prefix or self.data.name}-{key}"


def parse_params(data: Any, origin: str = "params", **sections: type[Strict]) -> Params:
    """Validate the shared sections, then each named experiment section with its model; the others stay unloaded."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"not experiment sections: {unknown}; they are {SECTIONS}")
    params = validate(Params, data, origin)
    context = {"methods": params.trained, "data": params.data}
    loaded = {name: validate(model, data.get(name) or {}, origin, f"{name}.", getattr(model, "union_tags", ()), context)
              for name, model in sections.items()}
    return params.model_copy(update={name: loaded.get(name, Unloaded(name)) for name in SECTIONS})


def read_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """params.yaml as a mapping of sections; a missing or malformed file is one ConfigError."""
    return read_mapping(path, yaml.safe_load, yaml.YAMLError, ConfigError, "not found (run from the project root, or pass --params)")


def load_params(path: str | os.PathLike = "params.yaml", **sections: type[Strict]) -> Params:
    """Read and validate params.yaml (see `parse_params`); any problem is one ConfigError naming the fields."""
    return parse_params(read_params(path), str(path), **sections)


__all__ = ["ConfigError", "MlflowParams", "Params", "RegistryParams", "load_params", "parse_params",
           "read_params"]
