"""Optimizers: the inner-loop optimizer protocol, its hand-designed baselines, and the learned LSTM optimizer."""

from metaflowlib.optim.functional import SGD, Adam, InnerOptimizer
from metaflowlib.optim.learned import (
    LearnedOptimizer,
    LSTMOptimizerNet,
    LSTMState,
    load_optimizer,
    preprocess_gradient,
    save_optimizer,
)
from metaflowlib.optim.meta_train import (
    OptimizeeTask,
    TaskFactory,
    classifier_task,
    meta_train_optimizer,
    quadratic_task,
    run_optimizee,
    synthetic_images,
)

__all__ = [
    "SGD",
    "Adam",
    "InnerOptimizer",
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
