"""The learned LSTM optimizer (Andrychowicz et al. 2016), its meta-training and benchmark (its report:
metaflowlib.report.learned_optimizer; served: metaflowlib.serving.learned_optimizer).

It speaks the inner-optimizer protocol of `metaflowlib.methods.inner_optimizers`, next to the methods
that drive it; nothing below `metaflowlib.methods` imports this package.
"""

from metaflowlib.learned_optimizer.learned import (
    LearnedOptimizer,
    LSTMOptimizerNet,
    LSTMState,
    load_optimizer,
    preprocess_gradient,
    save_optimizer,
)
from metaflowlib.learned_optimizer.meta_train import (
    OptimizeeTask,
    TaskFactory,
    classifier_task,
    meta_train_optimizer,
    quadratic_task,
    run_optimizee,
    synthetic_images,
)

__all__ = [
    "LearnedOptimizer",
    "LSTMOptimizerNet",
    "LSTMState",
    "load_optimizer",
    "preprocess_gradient",
    "save_optimizer",
    "OptimizeeTask",
    "TaskFactory",
    "classifier_task",
    "meta_train_optimizer",
    "quadratic_task",
    "run_optimizee",
    "synthetic_images",
]
