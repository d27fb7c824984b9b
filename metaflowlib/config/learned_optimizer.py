"""The `optimizer:` section (stages optimizer_train, optimizer_eval, optimizer_finetune): the learned LSTM optimizer
(issue 5); optimizee architectures come from `metaflowlib.learned_optimizer.tasks.ARCHITECTURES`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, model_validator

from metaflowlib.config.base import OMNIGLOT_EXAMPLES_PER_CLASS, Key, Setting, Strict, budget_type, budgets_type
from metaflowlib.learned_optimizer.tasks import ARCHITECTURES

FASHION_MNIST_CLASSES = 10
# meta-steps: one truncated unroll and one Adam update of the LSTM each
OptimizerBudgets = budgets_type(budget_type("steps"), {"steps": 1000, "seconds": 900}, {"steps": 20000})


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
    unseen_model: Literal[ARCHITECTURES] = "mlp2"
    tuning_tasks: int = Field(2, ge=1)  # per (pool, architecture), on Omniglot val and Fashion train classes
    adam_lrs: tuple[Annotated[float, Field(gt=0)], ...] = Field((1e-3, 3e-3, 1e-2, 3e-2, 1e-1), min_length=1)
    sgd_lrs: tuple[Annotated[float, Field(gt=0)], ...] = Field((1e-2, 3e-2, 1e-1, 3e-1, 1.0), min_length=1)
    momentum: float = Field(0.9, ge=0, lt=1)


class OptimizerFinetune(Strict):
    """The production learned optimizer driving MAML-family test-time fine-tuning (stage `optimizer_finetune`)."""

    methods: tuple[Key, ...] = ()  # keys of `methods` with an inner loop
    setting: Setting = "5w1s"
    tasks: int = Field(200, ge=1)
    learned_steps: int = Field(10, ge=1)  # a second run with this many learned steps (the first uses the model's own count)


class LearnedOptimizerParams(Strict):
    """Meta-training and evaluation of the LSTM optimizer on a distribution of small-classifier tasks."""

    seed: int = 0  # LSTM initialization and the meta-training task sequence
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")] = "learned-optimizer"  # registered '<prefix>-<name>'
    image_size: int = Field(14, ge=4, le=28)  # optimizee inputs, area-resized
    hidden: int = Field(20, ge=2)  # optimizee hidden units / conv channels
    batch_size: int = Field(64, ge=1)  # optimizee minibatch
    models: tuple[Literal[ARCHITECTURES], ...] = Field(("mlp", "conv"), min_length=1)
    omniglot: OptimizerOmniglotTasks = OptimizerOmniglotTasks()
    fashion: OptimizerFashionTasks = OptimizerFashionTasks()
    net: OptimizerNetParams = OptimizerNetParams()
    meta_train: OptimizerMetaTrain = OptimizerMetaTrain()
    evaluate: OptimizerEvaluate = OptimizerEvaluate()
    finetune: OptimizerFinetune = OptimizerFinetune()

    @model_validator(mode="after")
    def _finetuned_methods_exist(self, info: ValidationInfo) -> LearnedOptimizerParams:
        unknown = [m for m in self.finetune.methods if m not in (info.context or {}).get("methods", self.finetune.methods)]
        if unknown:
            raise ValueError(f"optimizer.finetune.methods {unknown} are not keys of methods (have: {', '.join(info.context['methods'])})")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> LearnedOptimizerParams:
        if self.evaluate.unseen_model in self.models:
            raise ValueError(f"evaluate.unseen_model {self.evaluate.unseen_model!r} is one of the meta-training models")
        if self.meta_train.horizon % self.evaluate.record_every:
            raise ValueError(f"evaluate.record_every {self.evaluate.record_every} must divide meta_train.horizon "
                             f"{self.meta_train.horizon}")
        return self
