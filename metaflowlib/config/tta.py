"""The `tta:` section (stages tta_data, tta_source, tta@<strategy>, tta_report): strategy and corruption names come
from their registries, `metaflowlib.tta.strategies.STRATEGIES` and `metaflowlib.data.corruptions.CORRUPTIONS`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from metaflowlib.config.base import Key, Strict
from metaflowlib.data.corruptions import CORRUPTIONS
from metaflowlib.errors import ConfigError
from metaflowlib.tta.strategies import STRATEGIES


class TTADataParams(Strict):
    """Fashion-MNIST and the shifted test set built from it (stage `tta_data`)."""

    source: str | None = None  # data root or the IDX directory; None -> $METAFLOWLIB_DATA, ../shared/data, then download
    verify_checksums: bool = True
    images: int = Field(1000, ge=2, le=10000)  # test images per corruption x severity
    corruptions: tuple[Literal[CORRUPTIONS], ...] = Field(CORRUPTIONS, min_length=1)
    severities: tuple[Annotated[int, Field(ge=1, le=5)], ...] = Field((1, 2, 3, 4, 5), min_length=1)

    @model_validator(mode="after")
    def _no_repeats(self) -> TTADataParams:
        for field in ("corruptions", "severities"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise ValueError(f"{field} lists a value twice: {list(values)}")
        return self


class TTATrainingParams(Strict):
    """The source classifier and its TTT twin, trained on Fashion-MNIST train (stage `tta_source`)."""

    hidden: int = Field(32, ge=1)  # Conv-4 channels
    shared_blocks: int = Field(2, ge=1, le=4)  # TTT: Conv-4 blocks in the shared extractor
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)  # Adam
    train_images: int | None = Field(None, ge=2)  # None: all 60000; fewer for quick runs
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class StrategyBase(Strict):
    batch_size: int = Field(200, ge=2)  # test batch: TENT's CIFAR-10-C setting

    @property
    def model(self) -> str:
        """Which trained classifier the strategy adapts: 'source' or its TTT twin 'ttt'."""
        return "source"


class SourceStrategy(StrategyBase):
    kind: Literal["source"]


class BNStrategy(StrategyBase):
    kind: Literal["bn"]


class GradientStrategy(StrategyBase):
    """A strategy that takes optimizer steps on an unsupervised loss of each test batch."""

    optimizer: Literal["adam", "sgd", "learned"]  # learned: the production learned LSTM optimizer (lr unused)
    lr: float = Field(gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd only
    steps: int | None = Field(None, ge=1)
    episodic: bool  # reset to the source weights before every batch; False: online

    @model_validator(mode="after")
    def _momentum_is_sgd(self) -> GradientStrategy:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum applies to optimizer 'sgd' only (got optimizer {self.optimizer!r})")
        return self


class TentStrategy(GradientStrategy):
    """Wang et al.'s reference: Adam lr 1e-3, one step per batch, online."""

    kind: Literal["tent"]
    optimizer: Literal["adam", "sgd", "learned"] = "adam"
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(1, ge=1)
    episodic: bool = False


class TTTStrategy(GradientStrategy):
    """Sun et al.: SGD lr 1e-3; episodic (standard, 10 steps) or online (1 step, the default)."""

    kind: Literal["ttt"]
    optimizer: Literal["adam", "sgd", "learned"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    episodic: bool = False
    update_rotation_head: bool = False

    @property
    def model(self) -> str:
        return "ttt"


StrategyParams = Annotated[SourceStrategy | BNStrategy | TentStrategy | TTTStrategy, Field(discriminator="kind")]


def _default_strategies() -> dict[str, StrategyParams]:
    return {"source": SourceStrategy(kind="source"), "bn": BNStrategy(kind="bn"), "tent": TentStrategy(kind="tent"),
            "ttt": TTTStrategy(kind="ttt")}


class TTAParams(Strict):
    """Test-time adaptation on a shifted test set: data, source training, one block per `tta@<key>` stage."""

    union_tags: ClassVar[tuple[str, ...]] = tuple(STRATEGIES)  # a strategy block's kind, not a key the user wrote

    seed: int = Field(0, ge=0)  # test subset, corruption noise, source training
    data: TTADataParams = TTADataParams()
    training: TTATrainingParams = TTATrainingParams()
    channels_last: bool = True  # oneDNN layout for training and adaptation
    model_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = "fashion-mnist"
    experiment: str = "fashion-mnist-c"
    strategies: dict[Key, StrategyParams] = Field(
        default_factory=_default_strategies, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _kind_from_key(cls, data: Any) -> Any:
        """`tent: {}` means `tent: {kind: tent}`: a block named after a strategy needs no kind."""
        if not isinstance(data, dict) or not isinstance(data.get("strategies"), dict):
            return data
        strategies = {}
        for key, block in data["strategies"].items():
            block = {} if block is None else block
            if isinstance(block, dict) and "kind" not in block:
                if key not in STRATEGIES:
                    raise ValueError(f"strategies.{key} needs a kind (one of {', '.join(sorted(STRATEGIES))})")
                block = {**block, "kind": key}
            strategies[key] = block
        return {**data, "strategies": strategies}

    def strategy(self, key: str) -> StrategyParams:
        if key not in self.strategies:
            raise ConfigError(f"no strategy '{key}' in params.yaml tta.strategies (have: {', '.join(sorted(self.strategies))})")
        return self.strategies[key]

    def registered_name(self, model: str) -> str:
        """'<model_prefix>-source' or '<model_prefix>-ttt'."""
        return f"{self.model_prefix}-{model}"
