"""The adaptation gap (``MetaConfig.log_adaptation_gap``): how much the inner loop changes the query accuracy.

Per task i of a meta-step, on its adversarial query set Q_i (crafted against the meta-parameters theta):

    gap_i = acc(f_{theta_i'}, Q_i) - acc(f_theta, Q_i)

the accuracy of the adapted copy minus that of the meta-parameters on the same examples, both normalized by a
training-mode BatchNorm with Q_i's statistics, as the query pass is. An inner loop that changes nothing shows a
gap of 0. Logged in every step's record (``query_acc_theta`` and ``adaptation_gap``, one value per task) with no
extra host sync: it costs one forward pass of the query sets at theta per meta-step, without a graph, and leaves
training unchanged. At theta a FiLM model runs at its own code (zero: no task information).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...functional import Params, detach
from ...tasks import AttackTask
from ...views import stack_rows
from ..batched import task_forward, vectorized
from ..sets import TaskSets
from .base import MetaOption, OptionSetup

__all__ = ["AdaptationGap"]


class AdaptationGap(MetaOption):
    """Logs the query accuracy at the meta-parameters beside the adapted copies' (module docstring)."""

    field, name, distributed = "log_adaptation_gap", "adaptation_gap", False  # per rank's tasks only: refused

    def __init__(self, vmap_tasks: bool | None = None) -> None:
        self.vmap_tasks = vmap_tasks

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.log_adaptation_gap

    @classmethod
    def refusal(cls, config: Any, world: int) -> str | None:
        if config.query_attack != "meta":
            return ("MetaConfig.log_adaptation_gap compares the adapted copies with the meta-parameters on the same "
                    "query examples: it needs query_attack='meta'")  # fmt: skip
        return None

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> AdaptationGap:
        return cls(config.vmap_tasks)

    def logged(self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask],
               sets: Sequence[TaskSets], query_acc: Tensor) -> dict[str, Tensor]:  # fmt: skip
        query, query_y = stack_rows([s.query for s in sets]), stack_rows([s.query_y for s in sets])
        with torch.no_grad():
            logits, _ = task_forward(model, detach(params), buffers, query, batched=(),
                                     vectorize=vectorized(self.vmap_tasks, query.device))  # fmt: skip
        at_theta = (logits.argmax(-1) == query_y).float().mean(1)  # (T,)
        return {"query_acc_theta": at_theta, "adaptation_gap": query_acc - at_theta}
