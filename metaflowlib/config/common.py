"""The sections every stage reads: data, training and evaluation protocol, tracking, registry; and the shape of a
method block (its own arguments are checked against the method class, in `config.methods`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from metaflowlib.config.base import Key, Setting, Strict, budget_type, budgets_type

EpisodeBudget = budget_type("episodes")  # meta-steps: one batch of tasks_per_step tasks and one outer update each
EpochBudget = budget_type("epochs")  # passes over the training split
MethodBudgets = budgets_type(EpisodeBudget, {"episodes": 2000}, {"episodes": 30000})
PretrainBudgets = budgets_type(EpochBudget, {"epochs": 8, "seconds": 600}, {"epochs": 40})


class TentSettings(Strict):
    """TENT's steps and Adam lr on the BatchNorm affine parameters. The defaults are for one few-shot task, the task
    the only test batch, so updates must pay off on it (the reference's 1 step at 1e-3 would return the BN logits
    unchanged): shift.tent and serving.tent_fewshot."""

    steps: int = Field(3, ge=1)
    lr: float = Field(0.01, gt=0)


class ServingParams(Strict):
    """What a served model does when a request asks for test-time adaptation (params {"strategy": "tent"}):
    recorded with each logged model by the stage that logs it."""

    tent_fewshot: TentSettings = TentSettings()  # per task
    tent_classifier: TentSettings = TentSettings(steps=1, lr=1e-3)  # per request batch: Wang et al.'s settings


class DataParams(Strict):
    dataset: Literal["omniglot", "custom"] = "omniglot"
    protocol: Literal["vinyals", "lake"] = "vinyals"
    source: str | None = None  # data root; None -> $METAFLOWLIB_DATA, ../shared/data, then the official download
    custom_source: str | None = None  # dataset=custom: a Hugging Face dataset id or an imagefolder directory
    image_size: int = Field(28, ge=8, le=512)
    channels: Literal[1, 3] | None = None  # None -> chosen by the data: Omniglot 1; custom 3 if any image has colour
    lake_val_alphabets: int = Field(5, ge=1)
    split_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    split_seed: int = 0
    verify_checksums: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> DataParams:
        if self.dataset == "custom" and not self.custom_source:
            raise ValueError("dataset 'custom' needs custom_source (a Hugging Face dataset id or an imagefolder directory)")
        if self.dataset == "omniglot" and self.channels == 3:
            raise ValueError("Omniglot is grayscale ink on paper: channels must be 1 or null for dataset 'omniglot'")
        if any(f <= 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions {self.split_fractions} must be positive and sum to 1")
        return self

    @property
    def name(self) -> str:
        """Experiment/dataset name, e.g. 'omniglot-vinyals'."""
        return f"omniglot-{self.protocol}" if self.dataset == "omniglot" else "custom"

    @property
    def expected_channels(self) -> int:
        """The channels methods are checked with before prepare has seen the images (the stages build with the
        prepared data's own): `channels` when set, else 1 for Omniglot and 3 (photos) for custom data."""
        return self.channels or (1 if self.dataset == "omniglot" else 3)


class MetaOptimizer(Strict):
    """The outer-loop optimizer of omega and its schedule: `step` (Snell et al.: Adam 1e-3 halved every
    2000 episodes) or `linear` to 0 at the end of the episode budget (Nichol et al.'s `--meta-step-final 0`)."""

    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["step", "linear"] = "step"
    decay_every: int = Field(2000, ge=1)
    decay: float = Field(0.5, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)


class PretrainParams(Strict):
    """Supervised many-way pre-training of a feature map (cosine classifier, learned scale; Adam)."""

    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    scale: float = Field(10.0, gt=0)  # initial scale of the cosine classifier
    budget: PretrainBudgets = PretrainBudgets()


class MethodBlock(Strict):
    """A `methods:` block: what every method shares; unset fields take the method class's `block_defaults`.
    Any other key is an argument of the method class (checked against its signature by `config.methods`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Key
    ways: int | None = Field(None, ge=2)
    shots: int | None = Field(None, ge=1)
    queries: int | None = Field(None, ge=1)
    tasks_per_step: int | None = Field(None, ge=1)  # meta-batch size
    meta_optimizer: MetaOptimizer | None = None
    budget: MethodBudgets | None = None
    val_every: int | None = Field(None, ge=1)  # episodes between validations; null: train.val_every
    description: str = ""
    pretrain: PretrainParams | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The keys this block sets for the method class itself."""
        return dict(self.model_extra or {})


class ValidationParams(Strict):
    ways: int = Field(5, ge=2)
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)
    tasks: int = Field(200, ge=1)  # fixed validation tasks, the same at every validation


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
    # auto: on a CPU the faster of fp32 and bf16 autocast (bf16 only where the CPU has bf16 units and it is >= 10%
    # faster), timed on the method's own step and cached per machine (metaflowlib.precision); on a GPU bf16 where supported
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"  # auto: timed with precision on a CPU (oneDNN); on on a GPU (Tensor Cores)
    progress: Literal["auto", "bar", "log", "off"] = "auto"  # auto: a bar on a terminal, a line per validation otherwise
    launcher: LauncherParams = LauncherParams()


class EvaluateParams(Strict):
    tasks: int = Field(1000, ge=1)  # fixed test tasks per setting (Snell et al.: 1000)
    queries: int = Field(15, ge=1)
    settings: tuple[Setting, ...] = ("5w1s", "5w5s", "20w1s", "20w5s")
    shots_curve: tuple[int, ...] = (1, 5, 10, 20)  # accuracy vs shots at 5-way (capped by examples per class)
    seed: int = 2017
    batch_tasks: int = Field(50, ge=1)
    timing_tasks: int = Field(100, ge=1)  # tasks timed one at a time from raw images for the adaptation cost


class MlflowParams(Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # None -> the dataset name, e.g. 'omniglot-vinyals'
    artifact_location: str = "mlartifacts"  # for new experiments on a local store


class PaperRunParams(Strict):
    """A paper run trained elsewhere (bench/paper_run.py on a GPU) and imported as a training run."""

    run: str = Field(min_length=1)  # its directory, relative to the project root: bench/results/paper_runs/<name>


class RegistryParams(Strict):
    model_prefix: str | None = None  # registered name = '<prefix>-<method key>'; None -> dataset name
    gate_metric: Annotated[str, Field(pattern=r"^acc_\d+w\d+s$")] = "acc_5w1s"
    promote_first: bool = True  # the pipeline may promote a version when no production version exists
    confidence: float = Field(0.95, gt=0.5, lt=1)  # promotion gate: the paired interval of the gain must lie above 0


