"""Worst-case aggregation over the tasks of a meta-batch (``MetaConfig.task_aggregation``), MAX-style.

The meta-loss sum_i w_i L_i, with L_i the adapted copies' query losses, takes its weights from the losses
themselves (held constant in the gradient):

    "mean"     w_i = 1/T                                   (MAML; the default: no option)
    "max"      w_i = 1 for the task with the largest L_i, 0 for the others (ties: the first)
    "softmax"  w_i = softmax(L / tau)_i, tau = aggregation_temperature > 0 (tau -> 0: max; tau -> inf: mean)

so the meta-parameters follow the attack type their adapted copies handle worst, as MAX training (Tramer and
Boneh 2019) follows the worst attack. The weights are logged as ``task_weights``. Task attention learns the
weights instead: the two are exclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...functional import Params
from ...tasks import AttackTask
from ..sets import TaskSets
from .base import Aggregate, MetaOption, OptionSetup

__all__ = ["WorstCase"]


class WorstCase(MetaOption):
    """Task weights from the task losses: their arg max, or a softmax at a temperature (module docstring)."""

    field, name = "task_aggregation", "worst_case"

    def __init__(self, mode: str, temperature: float = 1.0) -> None:
        self.mode, self.temperature = mode, temperature

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.task_aggregation != "mean"

    @classmethod
    def refusal(cls, config: Any, world: int) -> str | None:
        if config.task_attention:
            return (
                f"MetaConfig.task_aggregation={config.task_aggregation!r} and task_attention both set the task weights"
            )
        return None

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> WorstCase:
        return cls(config.task_aggregation, config.aggregation_temperature)

    def aggregate(self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask],
                  sets: Sequence[TaskSets], losses: Tensor, query_loss: Tensor,
                  query_acc: Tensor) -> Aggregate:  # fmt: skip
        scores = losses.detach()
        if self.mode == "max":
            weights = F.one_hot(scores.argmax(), len(scores)).to(scores.dtype)
        else:
            weights = torch.softmax(scores / self.temperature, 0)
        return Aggregate(weights=weights, logged={"task_weights": weights})
