"""params.yaml, parsed once into typed, validated objects.

Every section forbids unknown keys; every method block is one member of a
discriminated union on `kind`. A bad value fails before any work, with one
message that lists each offending field, its value and why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from metaflowlib.errors import ConfigError

OMNIGLOT_EXAMPLES_PER_CLASS = 20
VINYALS_CLASSES = {"train": 4112, "val": 688, "test": 1692}
SETTING_PATTERN = r"^\d+w\d+s$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Strict):
    dataset: Literal["omniglot", "custom"] = "omniglot"
    protocol: Literal["vinyals", "lake"] = "vinyals"
    source: str | None = None  # data root; None -> $METAFLOWLIB_DATA, ../shared/data, then the official download
    custom_source: str | None = None  # dataset=custom: a Hugging Face dataset id or an imagefolder directory
    image_size: int = Field(28, ge=8, le=512)
    lake_val_alphabets: int = Field(5, ge=1)
    split_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    split_seed: int = 0
    verify_checksums: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> DataParams:
        if self.dataset == "custom" and not self.custom_source:
            raise ValueError("dataset 'custom' needs custom_source (a Hugging Face dataset id or an imagefolder directory)")
        if any(f <= 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions {self.split_fractions} must be positive and sum to 1")
        return self

    @property
    def name(self) -> str:
        """Experiment/dataset name, e.g. 'omniglot-vinyals'."""
        return f"omniglot-{self.protocol}" if self.dataset == "omniglot" else "custom"


class Budget(Strict):
    """Meta-training length in episodes, so a result does not depend on the machine that produced it; `seconds`
    is only a cap: a run it stops early is tagged `budget_capped` and warned about."""

    episodes: int = Field(ge=1)
    seconds: float | None = Field(None, gt=0)


class Budgets(Strict):
    default: Budget = Budget(episodes=2000)
    full: Budget = Budget(episodes=30000)


class MetaOptimizer(Strict):
    """The outer-loop optimizer of omega and its schedule: `step` (Snell et al.: Adam 1e-3 halved every
    2000 episodes) or `linear` to 0 at the end of the episode budget (Nichol et al.'s `--meta-step-final 0`)."""

    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["step", "linear"] = "step"
    decay_every: int = Field(2000, ge=1)
    decay: float = Field(0.5, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)


class MethodBase(Strict):
    """Fields every method shares: the training task shape, the outer optimizer, the budget."""

    ways: int = Field(60, ge=2)
    shots: int = Field(5, ge=1)
    queries: int = Field(5, ge=1)
    tasks_per_step: int = Field(1, ge=1)  # meta-batch size
    meta_optimizer: MetaOptimizer = MetaOptimizer()
    budget: Budgets = Budgets()
    val_every: int | None = Field(None, ge=1)  # episodes between validations; null: train.val_every
    description: str = ""

    def model_config_dict(self, image_size: int) -> dict[str, Any]:
        """Constructor arguments of the method class (omega's architecture and adaptation settings)."""
        raise NotImplementedError


class ProtoNetParams(MethodBase):
    kind: Literal["protonet"]
    hidden: int = Field(64, ge=1)
    distance: Literal["euclidean", "cosine"] = "euclidean"
    temperature: float = Field(10.0, gt=0)

    def model_config_dict(self, image_size: int) -> dict[str, Any]:
        return {"hidden": self.hidden, "distance": self.distance, "temperature": self.temperature}


class InitializationParams(MethodBase):
    """The MAML family: omega = the initialization theta of Conv-4 + an N-way head (N = `ways`).

    Defaults: Finn et al.'s 5-way Omniglot settings (1 inner step, alpha 0.4,
    meta-batch 32, Adam 1e-3, 3 inner steps at test time).
    """

    ways: int = Field(5, ge=2)
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)
    tasks_per_step: int = Field(32, ge=1)
    hidden: int = Field(64, ge=1)
    inner_steps: int = Field(1, ge=1)
    inner_steps_eval: int = Field(3, ge=1)
    inner_lr: float = Field(0.4, gt=0)
    head_init: Literal["zeros", "normal"] = "zeros"  # zeros: all logits equal under theta; normal: N(0, 1) as Finn et al.'s code
    layout: Literal["strided", "maxpool"] = "strided"  # strided: Finn et al.'s Omniglot Conv-4; maxpool: ProtoNet's
    vectorize: Literal["auto", "vmap", "loop"] = "auto"  # auto: vmap over tasks on CUDA, a per-task loop on CPU
    chunk_size: int | None = Field(None, ge=1)  # tasks per vmap chunk: trades speed for memory
    budget: Budgets = Budgets(default=Budget(episodes=1000), full=Budget(episodes=60000))

    def model_config_dict(self, image_size: int) -> dict[str, Any]:
        return {"ways": self.ways, "hidden": self.hidden, "image_size": image_size, "inner_steps": self.inner_steps,
                "inner_steps_eval": self.inner_steps_eval, "inner_lr": self.inner_lr, "head_init": self.head_init,
                "layout": self.layout, "vectorize": self.vectorize, "chunk_size": self.chunk_size}


class MAMLParams(InitializationParams):
    kind: Literal["maml", "fomaml"]


class ReptileParams(InitializationParams):
    """Nichol et al.: the outer update theta + beta * mean(W_i - theta) is SGD with lr = beta on Reptile's .grad."""

    kind: Literal["reptile"]
    shots: int = Field(5, ge=1)  # with use_query, 5 + 5 = Nichol et al.'s 10 train shots per class
    queries: int = Field(5, ge=1)
    inner_steps: int = Field(5, ge=1)
    inner_steps_eval: int = Field(50, ge=1)
    inner_lr: float = Field(1e-3, gt=0)
    inner_optimizer: Literal["adam", "sgd"] = "adam"  # Nichol et al.'s code: Adam with beta1 = 0
    inner_batch: int | None = Field(10, ge=1)  # examples per inner step (Nichol et al.: 10); null: all
    tasks_per_step: int = Field(5, ge=1)
    use_query: bool = True  # inner loop on support + query of each training task
    meta_optimizer: MetaOptimizer = MetaOptimizer(name="sgd", lr=1.0, schedule="linear")

    def model_config_dict(self, image_size: int) -> dict[str, Any]:
        return {**super().model_config_dict(image_size), "use_query": self.use_query,
                "inner_optimizer": self.inner_optimizer, "inner_batch": self.inner_batch}

    @model_validator(mode="after")
    def _plain_sgd(self) -> ReptileParams:
        if self.meta_optimizer.name != "sgd":
            raise ValueError("reptile's outer update is theta + beta * mean(W_i - theta): meta_optimizer.name must be 'sgd'")
        return self


class IMAMLParams(InitializationParams):
    """Rajeswaran et al.: proximal inner problem, implicit meta-gradient by conjugate gradient."""

    kind: Literal["imaml"]
    inner_steps: int = Field(10, ge=1)
    inner_steps_eval: int = Field(10, ge=1)
    inner_lr: float = Field(0.1, gt=0)
    lam: float = Field(2.0, gt=0)
    cg_steps: int = Field(5, ge=1)
    cg_damping: float = Field(1.0, ge=0)  # A = (1 + cg_damping) I + H / (lam + lam_damping): imaml_dev's defaults
    lam_damping: float = Field(10.0, ge=0)

    def model_config_dict(self, image_size: int) -> dict[str, Any]:
        return {**super().model_config_dict(image_size), "lam": self.lam, "cg_steps": self.cg_steps,
                "cg_damping": self.cg_damping, "lam_damping": self.lam_damping}


class PretrainBudget(Strict):
    """Stop at whichever limit comes first; at least one must be set."""

    epochs: int | None = Field(None, ge=1)
    seconds: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> PretrainBudget:
        if self.epochs is None and self.seconds is None:
            raise ValueError("a pre-training budget needs epochs or seconds")
        return self


class PretrainBudgets(Strict):
    default: PretrainBudget = PretrainBudget(epochs=8, seconds=600)
    full: PretrainBudget = PretrainBudget(epochs=40)


class PretrainParams(Strict):
    """Supervised many-way pre-training of a feature map (cosine classifier, learned scale; Adam)."""

    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    scale: float = Field(10.0, gt=0)  # initial scale of the cosine classifier
    budget: PretrainBudgets = PretrainBudgets()


class ParamPredictionParams(MethodBase):
    """Qiao et al. 2018 / Gidaris & Komodakis 2018: a frozen pre-trained feature map, a meta-trained weight predictor."""

    kind: Literal["param_prediction"]
    ways: int = Field(20, ge=2)
    shots: int = Field(5, ge=1)
    queries: int = Field(15, ge=1)
    tasks_per_step: int = Field(4, ge=1)
    hidden: int = Field(64, ge=1)
    predictor_hidden: int = Field(256, ge=0)  # 0: a linear predictor (Qiao et al.)
    combine_prototypes: bool = True  # w_k = phi_avg * a_k + phi(a_k) (Gidaris & Komodakis); False: w_k = phi(a_k)
    scale: float = Field(10.0, gt=0)
    pretrain: PretrainParams = PretrainParams()
    budget: Budgets = Budgets(default=Budget(episodes=20000), full=Budget(episodes=20000))

    def model_config_dict(self, image_size: int) -> dict[str, Any]:
        return {"hidden": self.hidden, "image_size": image_size, "predictor_hidden": self.predictor_hidden,
                "combine_prototypes": self.combine_prototypes, "scale": self.scale}


MethodParams = Annotated[
    ProtoNetParams | MAMLParams | ReptileParams | IMAMLParams | ParamPredictionParams, Field(discriminator="kind")
]
METHOD_KINDS = {"protonet", "maml", "fomaml", "reptile", "imaml", "param_prediction"}


class ValidationParams(Strict):
    ways: int = Field(5, ge=2)
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)
    episodes: int = Field(200, ge=1)


class LauncherParams(Strict):
    """How `train@<method>` runs: one process, or data-parallel on this node under torchrun (docs/distributed.md).

    Under torchrun each method's tasks_per_step is the global meta-batch and must divide by nproc_per_node.
    """

    kind: Literal["none", "torchrun"] = "none"
    nproc_per_node: int = Field(2, ge=1)  # processes for kind torchrun (CPU: cores; CUDA: one per GPU)


class TrainParams(Strict):
    val_every: int = Field(250, ge=1)  # episodes between validations (best omega by val accuracy is kept)
    validation: ValidationParams = ValidationParams()
    checkpoint_every: int = Field(500, ge=1)  # episodes (pretrain@: minibatches) between checkpoints; results do not depend on it
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where the CPU/GPU supports it
    channels_last: bool = True  # oneDNN's fast path on CPU; Tensor Cores' on GPU
    progress: Literal["auto", "bar", "log", "off"] = "auto"  # auto: a bar on a terminal, a line per validation otherwise
    launcher: LauncherParams = LauncherParams()


class EvaluateParams(Strict):
    episodes: int = Field(1000, ge=1)
    queries: int = Field(15, ge=1)
    settings: tuple[Annotated[str, Field(pattern=SETTING_PATTERN)], ...] = ("5w1s", "5w5s", "20w1s", "20w5s")
    shots_curve: tuple[int, ...] = (1, 5, 10, 20)  # accuracy vs shots at 5-way (capped by examples per class)
    seed: int = 2017
    batch_tasks: int = Field(50, ge=1)
    timing_tasks: int = Field(100, ge=1)  # tasks timed one at a time from raw images for the adaptation cost


class MlflowParams(Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # None -> the dataset name, e.g. 'omniglot-vinyals'
    artifact_location: str = "mlartifacts"  # for new experiments on a local store


class RegistryParams(Strict):
    model_prefix: str | None = None  # registered name = '<prefix>-<method key>'; None -> dataset name
    gate_metric: Annotated[str, Field(pattern=r"^acc_\d+w\d+s$")] = "acc_5w1s"
    promote_first: bool = True  # the pipeline may promote a version when no production version exists
    confidence: float = Field(0.95, gt=0.5, lt=1)  # promotion gate: the paired interval of the gain must lie above 0


# Test-time adaptation benchmark (issue 6): the `tta:` section. Names of
# metaflowlib.data.corruptions.CORRUPTIONS, repeated so params load without torch (a test keeps them equal).
CORRUPTION_NAMES = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
STRATEGY_KINDS = {"source", "bn", "tent", "ttt"}


class TTADataParams(Strict):
    """Fashion-MNIST and the shifted test set built from it (stage `tta_data`)."""

    source: str | None = None  # data root or the IDX directory; None -> $METAFLOWLIB_DATA, ../shared/data, then download
    verify_checksums: bool = True
    images: int = Field(1000, ge=2, le=10000)  # test images per corruption x severity
    corruptions: tuple[Literal[CORRUPTION_NAMES], ...] = Field(CORRUPTION_NAMES, min_length=1)
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

    seed: int = Field(0, ge=0)  # test subset, corruption noise, source training
    data: TTADataParams = TTADataParams()
    training: TTATrainingParams = TTATrainingParams()
    channels_last: bool = True  # oneDNN layout for training and adaptation
    model_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = "fashion-mnist"
    experiment: str = "fashion-mnist-c"
    strategies: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], StrategyParams] = Field(
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
                if key not in STRATEGY_KINDS:
                    raise ValueError(f"strategies.{key} needs a kind (one of {', '.join(sorted(STRATEGY_KINDS))})")
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


# The learned LSTM optimizer (issue 5): the `optimizer:` section, read by stages optimizer_train and optimizer_eval.
OPTIMIZEE_ARCHITECTURES = ("mlp", "conv", "mlp2")  # metaflowlib.optim.tasks.ARCHITECTURES, repeated so params load without torch
FASHION_MNIST_CLASSES = 10


class OptimizerOmniglotTasks(Strict):
    """N-way optimizee tasks from the prepared Omniglot splits (train: meta-training, val: tuning, test: evaluation)."""

    ways: int = Field(10, ge=2)
    train_per_class: int = Field(15, ge=1)  # drawings the optimizee trains on
    test_per_class: int = Field(5, ge=1)  # drawings kept apart for its test accuracy

    @model_validator(mode="after")
    def _fits_a_class(self) -> OptimizerOmniglotTasks:
        if self.train_per_class + self.test_per_class > OMNIGLOT_EXAMPLES_PER_CLASS:
            raise ValueError(f"train_per_class + test_per_class = {self.train_per_class + self.test_per_class} exceeds "
                             f"the {OMNIGLOT_EXAMPLES_PER_CLASS} drawings per Omniglot class")
        return self


class OptimizerFashionTasks(Strict):
    """N-way optimizee tasks from Fashion-MNIST: meta-training and tuning on some classes, evaluation on the others."""

    source: str | None = None  # data root or the IDX directory; None -> $METAFLOWLIB_DATA, ../shared/data, then download
    verify_checksums: bool = True
    train_classes: tuple[Annotated[int, Field(ge=0, lt=FASHION_MNIST_CLASSES)], ...] = (0, 1, 2, 3, 4)
    eval_classes: tuple[Annotated[int, Field(ge=0, lt=FASHION_MNIST_CLASSES)], ...] = (5, 6, 7, 8, 9)
    ways: int = Field(5, ge=2)
    train_per_class: int = Field(100, ge=1, le=6000)  # from the official train split (6000 per class)
    test_per_class: int = Field(100, ge=1, le=1000)  # from the official test split (1000 per class)

    @model_validator(mode="after")
    def _disjoint_classes(self) -> OptimizerFashionTasks:
        if set(self.train_classes) & set(self.eval_classes):
            raise ValueError(f"train_classes {list(self.train_classes)} and eval_classes {list(self.eval_classes)} overlap")
        if self.ways > min(len(set(self.train_classes)), len(set(self.eval_classes))):
            raise ValueError(f"{self.ways} ways need that many train_classes and eval_classes")
        return self


class OptimizerNetParams(Strict):
    """The coordinate-wise LSTM (Andrychowicz et al.: 2 layers of 20, output x 0.1, preprocessing p = 10)."""

    hidden_size: int = Field(20, ge=1)
    num_layers: int = Field(2, ge=1)
    output_scale: float = Field(0.1, gt=0)
    preprocess_p: float = Field(10.0, gt=0)


class OptimizerBudget(Strict):
    """Meta-steps (one truncated unroll, one Adam update of the LSTM each) or seconds, whichever ends first."""

    steps: int | None = Field(None, ge=1)
    seconds: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> OptimizerBudget:
        if self.steps is None and self.seconds is None:
            raise ValueError("a budget needs steps or seconds")
        return self


class OptimizerBudgets(Strict):
    default: OptimizerBudget = OptimizerBudget(steps=1000, seconds=900)
    full: OptimizerBudget = OptimizerBudget(steps=20000)


class OptimizerMetaTrain(Strict):
    unroll: int = Field(20, ge=1)  # truncated BPTT window
    horizon: int = Field(100, ge=1)  # optimizee steps per task; a multiple of unroll
    lr: float = Field(3e-3, gt=0)  # Adam on the LSTM weights
    divergence_factor: float = Field(1e3, gt=1)  # an optimizee loss above this x its initial loss is a divergence
    budget: OptimizerBudgets = OptimizerBudgets()
    validation_tasks: int = Field(2, ge=1)  # per (pool, architecture): the registry gate's tasks

    @model_validator(mode="after")
    def _whole_unrolls(self) -> OptimizerMetaTrain:
        if self.horizon % self.unroll:
            raise ValueError(f"horizon {self.horizon} must be a multiple of unroll {self.unroll}")
        return self


class OptimizerEvaluate(Strict):
    """Held-out optimizee tasks: learned vs Adam (default lr and tuned) vs SGD with momentum (tuned)."""

    seed: int = 2017  # first task seed of every suite: tasks seed, seed + 1, ...
    tasks: int = Field(4, ge=1)  # per suite (pool x architecture)
    horizons: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 5, 10), min_length=1)  # multiples of the meta-training horizon
    record_every: int = Field(20, ge=1)  # optimizee steps between full train-loss / test-accuracy points
    unseen_model: Literal[OPTIMIZEE_ARCHITECTURES] = "mlp2"
    tuning_tasks: int = Field(2, ge=1)  # per (pool, architecture), on Omniglot val and Fashion train classes
    adam_lrs: tuple[Annotated[float, Field(gt=0)], ...] = Field((1e-3, 3e-3, 1e-2, 3e-2, 1e-1), min_length=1)
    sgd_lrs: tuple[Annotated[float, Field(gt=0)], ...] = Field((1e-2, 3e-2, 1e-1, 3e-1, 1.0), min_length=1)
    momentum: float = Field(0.9, ge=0, lt=1)


class OptimizerFinetune(Strict):
    """The production learned optimizer driving MAML-family test-time fine-tuning (stage `optimizer_finetune`)."""

    methods: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], ...] = ()  # keys of `methods` with an inner loop
    setting: Annotated[str, Field(pattern=SETTING_PATTERN)] = "5w1s"
    tasks: int = Field(200, ge=1)
    learned_steps: int = Field(10, ge=1)  # a second run with this many learned steps (the first uses the model's own count)


class LearnedOptimizerParams(Strict):
    """Meta-training and evaluation of the LSTM optimizer on a distribution of small-classifier tasks."""

    seed: int = 0  # LSTM initialization and the meta-training task sequence
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")] = "learned-optimizer"  # registered '<prefix>-<name>'
    image_size: int = Field(14, ge=4, le=28)  # optimizee inputs, area-resized
    hidden: int = Field(20, ge=2)  # optimizee hidden units / conv channels
    batch_size: int = Field(64, ge=1)  # optimizee minibatch
    models: tuple[Literal[OPTIMIZEE_ARCHITECTURES], ...] = Field(("mlp", "conv"), min_length=1)
    omniglot: OptimizerOmniglotTasks = OptimizerOmniglotTasks()
    fashion: OptimizerFashionTasks = OptimizerFashionTasks()
    net: OptimizerNetParams = OptimizerNetParams()
    meta_train: OptimizerMetaTrain = OptimizerMetaTrain()
    evaluate: OptimizerEvaluate = OptimizerEvaluate()
    finetune: OptimizerFinetune = OptimizerFinetune()

    @model_validator(mode="after")
    def _consistent(self) -> LearnedOptimizerParams:
        if self.evaluate.unseen_model in self.models:
            raise ValueError(f"evaluate.unseen_model {self.evaluate.unseen_model!r} is one of the meta-training models")
        if self.meta_train.horizon % self.evaluate.record_every:
            raise ValueError(f"evaluate.record_every {self.evaluate.record_every} must divide meta_train.horizon "
                             f"{self.meta_train.horizon}")
        return self


class ShiftTent(Strict):
    """TENT inside one few-shot task: the task is the only test batch, so updates must pay off on it."""

    steps: int = Field(3, ge=1)
    lr: float = Field(0.01, gt=0)  # Adam; the reference's 1 step at 1e-3 would return the BN logits unchanged


class ShiftParams(Strict):
    """Few-shot learners under shift (Omniglot-C): registered production meta-models on corrupted test tasks."""

    methods: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], ...] = ()  # keys of `methods`; none by default
    corruptions: tuple[str, ...] = CORRUPTION_NAMES
    severity: int = Field(5, ge=1, le=5)
    setting: Annotated[str, Field(pattern=SETTING_PATTERN)] = "5w1s"
    queries: int = Field(15, ge=1)
    tasks: int = Field(50, ge=1)  # per corruption; tasks are adapted one at a time
    seed: int = 2017
    tent: ShiftTent = ShiftTent()

    @model_validator(mode="after")
    def _known_corruptions(self) -> ShiftParams:
        unknown = sorted(set(self.corruptions) - set(CORRUPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(CORRUPTION_NAMES)}")
        return self


class Params(Strict):
    profile: Literal["default", "full"] = "default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams = DataParams()
    methods: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], MethodParams] = Field(min_length=1)
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    registry: RegistryParams = RegistryParams()
    tta: TTAParams = TTAParams()
    shift: ShiftParams = ShiftParams()
    optimizer: LearnedOptimizerParams = LearnedOptimizerParams()

    @model_validator(mode="after")
    def _shift_methods_exist(self) -> Params:
        for field, keys in (("shift.methods", self.shift.methods), ("optimizer.finetune.methods", self.optimizer.finetune.methods)):
            unknown = [m for m in keys if m not in self.methods]
            if unknown:
                raise ValueError(f"{field} {unknown} are not keys of methods (have: {', '.join(self.methods)})")
        return self

    @model_validator(mode="after")
    def _tasks_can_be_sampled(self) -> Params:
        """Refuse task shapes the data cannot supply (Omniglot: 20 drawings per class)."""
        if self.data.dataset != "omniglot":
            return self
        limit = OMNIGLOT_EXAMPLES_PER_CLASS
        shapes = [(f"methods.{k}", m.ways, m.shots + m.queries, "train") for k, m in self.methods.items()]
        shapes.append(("train.validation", self.train.validation.ways, self.train.validation.shots + self.train.validation.queries, "val"))
        shapes += [(f"evaluate.settings[{s}]", w, k + self.evaluate.queries, "test") for s, (w, k) in self.settings().items()]
        ways, shots = self.settings_of(self.shift.setting)
        shapes.append(("shift.setting", ways, shots + self.shift.queries, "test"))
        for field, ways, per_class, split in shapes:
            if per_class > limit:
                raise ValueError(f"{field}: shots + queries = {per_class} exceeds the {limit} examples per Omniglot class")
            if self.data.protocol == "vinyals" and ways > VINYALS_CLASSES[split]:
                raise ValueError(f"{field}: {ways} ways exceed the {VINYALS_CLASSES[split]} classes of the vinyals {split} split")
        return self

    def settings(self) -> dict[str, tuple[int, int]]:
        """'5w1s' -> (5, 1) for each evaluation setting."""
        return {setting: self.settings_of(setting) for setting in self.evaluate.settings}

    @staticmethod
    def settings_of(setting: str) -> tuple[int, int]:
        """'5w1s' -> (ways 5, shots 1)."""
        ways, shots = setting[:-1].split("w")
        return int(ways), int(shots)

    def method(self, key: str) -> MethodParams:
        if key not in self.methods:
            raise ConfigError(f"no method '{key}' in params.yaml methods (have: {', '.join(sorted(self.methods))})")
        return self.methods[key]

    def budget(self, key: str) -> Budget:
        return getattr(self.method(key).budget, self.profile)

    def pretrain(self, key: str) -> tuple[PretrainParams, PretrainBudget] | None:
        """The method's supervised pre-training and its budget under the profile, or None if it has none."""
        pretrain = getattr(self.method(key), "pretrain", None)
        return None if pretrain is None else (pretrain, getattr(pretrain.budget, self.profile))

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.data.name

    def registered_name(self, key: str) -> str:
        return f"{self.registry.model_prefix or self.data.name}-{key}"


def format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {error.error_count()} invalid value(s)"]
    for item in error.errors():
        loc = list(item["loc"])
        if len(loc) > 2 and loc[0] == "methods" and loc[2] in METHOD_KINDS:
            del loc[2]  # the union's tag, not a key the user wrote
        if len(loc) > 3 and loc[:2] == ["tta", "strategies"] and loc[3] in STRATEGY_KINDS:
            del loc[3]  # the same for a strategy block
        field = ".".join(str(p) for p in loc) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {field}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def parse_params(data: Any, origin: str = "params") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, origin)) from None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate params.yaml; any problem is one ConfigError naming the fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found (run from the project root, or pass --params)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return parse_params(data, str(path))
