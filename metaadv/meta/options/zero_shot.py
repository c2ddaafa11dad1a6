"""A zero-shot term (``MetaConfig.zero_shot_weight``): keep the meta-parameters themselves robust.

The meta-step's objective becomes

    L = sum_i w_i L(f_{theta_i'}, Q_i) + lambda * (1/T) sum_i L(f_theta, S_i)

with S_i each task's adversarial support set, crafted against theta (in both query modes), and lambda >= 0.
Meta-training alone optimizes the adapted copies; with query examples crafted against the adapted copy
(``query_attack="adapted"``, adversarial querying, Goldblum et al. 2020) theta itself may lose the zero-shot
robustness users evaluate first. The term is logged as ``zero_shot_loss`` (the record's ``loss`` stays the
adapted copies' meta-loss). It costs one forward pass of the support sets at theta (BatchNorm with each task's
statistics, nothing moved) and its backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ...functional import Params
from ...tasks import AttackTask
from ...views import stack_rows
from ..batched import task_cross_entropy, task_forward, vectorized
from ..sets import TaskSets
from .base import Aggregate, MetaOption, OptionSetup

__all__ = ["ZeroShotTerm"]


class ZeroShotTerm(MetaOption):
    """Adds lambda times the meta-parameters' mean adversarial support loss to the objective (module docstring)."""

    field, name, distributed = "zero_shot_weight", "zero_shot", False

    def __init__(self, weight: float, vmap_tasks: bool | None = None) -> None:
        self.weight, self.vmap_tasks = weight, vmap_tasks

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.zero_shot_weight > 0

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> ZeroShotTerm:
        return cls(config.zero_shot_weight, config.vmap_tasks)

    def aggregate(self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask],
                  sets: Sequence[TaskSets], losses: Tensor, query_loss: Tensor,
                  query_acc: Tensor) -> Aggregate:  # fmt: skip
        support, support_y = stack_rows([s.support for s in sets]), stack_rows([s.support_y for s in sets])
        logits, _ = task_forward(model, params, buffers, support, batched=(),
                                 vectorize=vectorized(self.vmap_tasks, support.device))  # fmt: skip
        zero_shot = task_cross_entropy(logits, support_y).mean()
        return Aggregate(objective=self.weight * zero_shot, logged={"zero_shot_loss": zero_shot.detach()})
