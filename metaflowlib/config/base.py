"""What every params section is built from: strict models, the one budget type, task settings, error messages."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from metaflowlib.errors import ConfigError

SETTING_PATTERN = r"^\d+w\d+s$"
Key = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]  # a params key that names a stage (train@<key>, tta@<key>)
Setting = Annotated[str, Field(pattern=SETTING_PATTERN)]
OMNIGLOT_EXAMPLES_PER_CLASS = 20
VINYALS_CLASSES = {"train": 4112, "val": 688, "test": 1692}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def settings_of(setting: str) -> tuple[int, int]:
    """'5w1s' -> (ways 5, shots 1)."""
    ways, shots = setting[:-1].split("w")
    return int(ways), int(shots)


def check_task_shape(data: Any, field: str, ways: int, per_class: int, split: str) -> None:
    """Refuse a task shape the data cannot supply (Omniglot: 20 drawings per class; the Vinyals splits' class counts)."""
    if data.dataset != "omniglot":
        return
    if per_class > OMNIGLOT_EXAMPLES_PER_CLASS:
        raise ValueError(f"{field}: shots + queries = {per_class} exceeds the {OMNIGLOT_EXAMPLES_PER_CLASS} examples per Omniglot class")
    if data.protocol == "vinyals" and ways > VINYALS_CLASSES[split]:
        raise ValueError(f"{field}: {ways} ways exceed the {VINYALS_CLASSES[split]} classes of the vinyals {split} split")


class Budget(Strict):
    """How long a training runs: a count of its unit (`episodes`, `epochs` or `steps`, whatever the section trains by),
    so that a result does not depend on the machine that produced it; `seconds` only caps a slow machine (a run it
    stops early is tagged `budget_capped` and warned about)."""

    unit: ClassVar[str]
    seconds: float | None = Field(None, gt=0)

    @property
    def count(self) -> int:
        return getattr(self, self.unit)


class Budgets(Strict):
    """One budget per profile (`default`: minutes on a CPU; `full`: the papers' budgets)."""

    def of(self, profile: str) -> Budget:
        return getattr(self, profile)


def budget_type(unit: str) -> type[Budget]:
    """The budget counted in `unit`: one definition for meta-training, pre-training and the learned optimizer."""
    return type(f"Budget_{unit}", (Budget,), {"__annotations__": {unit: int}, unit: Field(ge=1), "unit": unit,
                                             "__module__": __name__})


def budgets_type(budget: type[Budget], default: dict[str, Any], full: dict[str, Any]) -> type[Budgets]:
    """Budgets per profile, with these defaults."""
    return create_model(f"Budgets_{budget.unit}", __base__=Budgets,
                        default=(budget, budget(**default)), full=(budget, budget(**full)))


def format_validation_error(error: ValidationError, origin: str, prefix: str = "", tags: tuple[str, ...] = ()) -> str:
    """One line per offending field: its dotted path (under `prefix`), why, and the value. `tags` are the
    discriminators of tagged unions, which are not keys the user wrote."""
    lines = [f"{origin}: {error.error_count()} invalid value(s)"]
    for item in error.errors():
        loc = [p for p in item["loc"] if p not in tags]
        field = prefix + ".".join(str(p) for p in loc) if loc or prefix else "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {field.rstrip('.')}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def validate(model: type[BaseModel], data: Any, origin: str, prefix: str = "", tags: tuple[str, ...] = (),
             context: dict[str, Any] | None = None) -> Any:
    """`model` from `data`, or one ConfigError listing every offending field."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, origin, prefix, tags)) from None
