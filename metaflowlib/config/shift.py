"""The `shift:` section (stages shift@<method>): few-shot learners under shift (Omniglot-C); corruption names come
from `metaflowlib.data.corruptions.CORRUPTIONS`."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, model_validator

from metaflowlib.config.base import Key, Setting, Strict, check_task_shape, settings_of
from metaflowlib.config.common import TentSettings
from metaflowlib.data.corruptions import CORRUPTIONS


class ShiftParams(Strict):
    """Few-shot learners under shift (Omniglot-C): registered production meta-models on corrupted test tasks."""

    methods: tuple[Key, ...] = ()  # keys of `methods` or `paper_runs`; none by default
    corruptions: tuple[str, ...] = CORRUPTIONS
    severity: int = Field(5, ge=1, le=5)
    setting: Setting = "5w1s"
    queries: int = Field(15, ge=1)
    tasks: int = Field(50, ge=1)  # per corruption; tasks are adapted one at a time
    seed: int = 2017
    tent: TentSettings = TentSettings()

    @model_validator(mode="after")
    def _methods_exist(self, info: ValidationInfo) -> ShiftParams:
        """Keys of `methods` or `paper_runs` (given as context by `parse_params`), whose production versions are scored."""
        unknown = [m for m in self.methods if m not in (info.context or {}).get("methods", self.methods)]
        if unknown:
            raise ValueError(f"shift.methods {unknown} are not keys of methods or paper_runs (have: {', '.join(info.context['methods'])})")
        return self

    @model_validator(mode="after")
    def _tasks_can_be_sampled(self, info: ValidationInfo) -> ShiftParams:
        data = (info.context or {}).get("data")
        if data is not None:
            ways, shots = settings_of(self.setting)
            check_task_shape(data, "shift.setting", ways, shots + self.queries, "test")
        return self

    @model_validator(mode="after")
    def _known_corruptions(self) -> ShiftParams:
        unknown = sorted(set(self.corruptions) - set(CORRUPTIONS))
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(CORRUPTIONS)}")
        return self
