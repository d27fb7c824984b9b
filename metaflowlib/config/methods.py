"""A `methods:` block resolved against its method class, so a new method is one file plus a params block.

`kind` names a class of `metaflowlib.methods.METHODS`; the shared fields a block leaves unset take the class's
`block_defaults` (its paper's training shape and budget); every other key is an argument of the class, typed by
its signature, and the class is built once to check the values (a bad one is one ConfigError naming the field).
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from pydantic import Field, TypeAdapter, ValidationError

from metaflowlib.config import Params
from metaflowlib.config.base import Budget, Strict, check_task_shape, format_validation_error
from metaflowlib.config.common import MetaOptimizer, MethodBlock, MethodBudgets, PretrainParams
from metaflowlib.errors import ConfigError
from metaflowlib.methods import METHODS, MetaLearner
from metaflowlib.models.backbones import BackboneError

FROM_DATA = ("image_size", "in_channels")  # arguments the data section sets, never a block
SHARED = ("ways", "shots", "queries", "tasks_per_step", "meta_optimizer", "budget", "val_every", "description", "pretrain")


class MethodSpec(Strict):
    """A method block with every default filled in: what `train@<key>` and `pretrain@<key>` run."""

    kind: str
    ways: int = Field(5, ge=2)
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)
    tasks_per_step: int = Field(1, ge=1)
    meta_optimizer: MetaOptimizer = MetaOptimizer()
    budget: MethodBudgets = MethodBudgets()
    val_every: int | None = None
    description: str = ""
    pretrain: PretrainParams | None = None
    options: dict[str, Any] = {}  # the method class's own arguments, its signature's defaults filled in

    def model_config_dict(self, image_size: int, in_channels: int = 1) -> dict[str, Any]:
        """Constructor arguments of the method class: its options, plus `ways` and the data's image shape where it
        takes them."""
        accepted = constructor_parameters(METHODS[self.kind])
        shared = {"ways": self.ways, "image_size": image_size, "in_channels": in_channels}
        return {**{k: v for k, v in shared.items() if k in accepted}, **self.options}

    def build(self, image_size: int, in_channels: int = 1) -> MetaLearner:
        return METHODS[self.kind](**self.model_config_dict(image_size, in_channels))

    def budget_in(self, profile: str) -> Budget:
        return self.budget.of(profile)

    def pretrain_in(self, profile: str) -> tuple[PretrainParams, Budget] | None:
        """The supervised pre-training and its budget under `profile`, or None for a method without one."""
        return None if self.pretrain is None else (self.pretrain, self.pretrain.budget.of(profile))

    def flat(self) -> dict[str, Any]:
        """The block as a user would write it in full (options at top level): logged as MLflow params."""
        return {**self.model_dump(mode="json", exclude={"options"}), **self.options}


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments a class takes, following `**config` up to the parent that names them."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        found = {**{p.name: p for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}, **found}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return found


def _typed(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and name in inspect.signature(init).parameters:
            return typing.get_type_hints(init).get(name, Any)
    return Any


def method_spec(p: Params, key: str) -> MethodSpec:
    """methods.<key> resolved and checked; any problem is one ConfigError naming each offending field."""
    if key not in p.methods:
        raise ConfigError(f"no method '{key}' in params.yaml methods (have: {', '.join(sorted(p.methods))})")
    block: MethodBlock = p.methods[key]
    where = f"methods.{key}"
    if block.kind not in METHODS:
        raise ConfigError(f"{where}.kind: unknown method {block.kind!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[block.kind]
    accepted, errors, options = constructor_parameters(cls), [], {}
    for name, value in block.options.items():
        if name in FROM_DATA:
            errors.append(f"  {where}.{name}: set by the data section, not by a method block")
        elif name not in accepted:
            known = sorted(set(accepted) - set(FROM_DATA) - set(SHARED))
            errors.append(f"  {where}.{name}: not an argument of {cls.__name__} (it takes {', '.join(known)})")
        else:
            try:
                options[name] = TypeAdapter(_typed(cls, name)).validate_python(value, strict=False)
            except ValidationError as error:
                errors.append(f"  {where}.{name}: {error.errors()[0]['msg']} (got {value!r})")
    if errors:
        raise ConfigError(f"params: {len(errors)} invalid value(s)\n" + "\n".join(errors))
    defaults = {name: q.default for name, q in accepted.items()
                if name not in (*FROM_DATA, *SHARED) and q.default is not inspect.Parameter.empty}
    options = {**defaults, **options}
    set_fields = block.model_dump(include=set(SHARED), exclude_unset=True)
    budget = {**cls.block_defaults.get("budget", {}), **set_fields.get("budget", {})}  # a profile the block leaves out keeps the class's
    resolved = {"kind": block.kind, **cls.block_defaults, **set_fields, "options": options, **({"budget": budget} if budget else {})}
    try:
        spec = MethodSpec.model_validate(resolved)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, "params", f"{where}.")) from None
    _check(spec, cls, p, where)
    return spec


def _check(spec: MethodSpec, cls: type[MetaLearner], p: Params, where: str) -> None:
    """What only the class and the data know: its outer update, the task shape, and the arguments' values."""
    if spec.pretrain is not None and cls.pretrained_module is None:
        raise ConfigError(f"{where}.pretrain: {spec.kind} starts from no pre-trained module")
    required = cls.outer_optimizer
    if required is not None and spec.meta_optimizer.name != required[0]:
        raise ConfigError(f"{where}: {required[1]}: meta_optimizer.name must be {required[0]!r}")
    try:
        check_task_shape(p.data, where, spec.ways, spec.shots + spec.queries, "train")
        spec.build(p.data.image_size, p.data.expected_channels)
    except BackboneError as error:  # its message starts with the field: backbone, backbone.kind, ...
        raise ConfigError(f"{where}.{error}") from None
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
