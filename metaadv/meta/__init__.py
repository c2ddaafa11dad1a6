"""The meta-learner: the inner loop (``adapt``), the meta-step (craft -> adapt -> query -> aggregate), its
options (``options/``, one file each) and ``meta_train``, the driver that hands the meta-step to the engine."""

from .craft import attack_precision, craft_task_sets
from .inner import adapt, adapt_tasks, init_inner_lr, inner_parameter_names
from .losses import query_loss, task_losses
from .sets import TaskSets
from .step import MetaBatchLoss, meta_batch_loss
from .train import meta_train

__all__ = [
    "MetaBatchLoss",
    "TaskSets",
    "adapt",
    "adapt_tasks",
    "attack_precision",
    "craft_task_sets",
    "init_inner_lr",
    "inner_parameter_names",
    "meta_batch_loss",
    "meta_train",
    "query_loss",
    "task_losses",
]
