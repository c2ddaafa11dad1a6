"""A cross-attack consistency term (``MetaConfig.consistency_weight``): the tasks' attacks, one set of examples.

The meta-step's objective becomes

    L = sum_i w_i L(f_{theta_i'}, Q_i) + lambda * (1/|P|) sum_{(i,j) in P} SKL(p_theta(A_i(x)), p_theta(A_j(x)))

with x the first task's clean query examples (Q of them), A_i(x) task i's attack on them crafted against the
meta-parameters theta, p_theta theta's softmax on each version (normalized with that version's own batch
statistics, as every set is; nothing moved), SKL(p, q) = (KL(p||q) + KL(q||p)) / 2 averaged over the examples,
and P the pairs of tasks of different attack types (none: the term is 0). As RAMP (Jiang et al. 2023) pairs
the predictions on the Linf and L1 versions of an example, it pulls theta toward predictions that do not
depend on which threat model made the perturbation. Logged as ``consistency_loss``. Costs one attack call per
task on Q examples and one forward pass of the T versions at theta, with its backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...functional import Params
from ...tasks import AttackTask
from ...views import stack_rows
from ..batched import task_forward, task_model_fn, vectorized
from ..sets import TaskSets
from .base import Aggregate, MetaOption, OptionSetup

__all__ = ["ConsistencyTerm", "symmetric_kl"]


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """(KL(p||q) + KL(q||p)) / 2 of the softmaxes of logits (B, K), averaged over the B examples (nats)."""
    log_p, log_q = F.log_softmax(logits_p, -1), F.log_softmax(logits_q, -1)
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()


class ConsistencyTerm(MetaOption):
    """Adds lambda times the mean symmetric KL between theta's predictions on the tasks' attacks of the same
    examples (module docstring)."""

    field, name, distributed = "consistency_weight", "consistency", False

    def __init__(self, weight: float, vmap_tasks: bool | None = None) -> None:
        self.weight, self.vmap_tasks = weight, vmap_tasks

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.consistency_weight > 0

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> ConsistencyTerm:
        return cls(config.consistency_weight, config.vmap_tasks)

    def aggregate(self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask],
                  sets: Sequence[TaskSets], losses: Tensor, query_loss: Tensor,
                  query_acc: Tensor) -> Aggregate:  # fmt: skip
        x, y = sets[0].query_clean, sets[0].query_y
        pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))
                 if tasks[i].type_index != tasks[j].type_index]  # fmt: skip
        if not pairs:
            zero = x.new_zeros(())
            return Aggregate(objective=zero, logged={"consistency_loss": zero})
        vectorize = vectorized(self.vmap_tasks, x.device)
        attack_model = task_model_fn(model, params, buffers, 1, vectorize=vectorize)  # theta, statistics unmoved
        versions = stack_rows([task(attack_model, x, y, check=False) for task in tasks])  # (T, Q, C, H, W)
        logits, _ = task_forward(model, params, buffers, versions, batched=(), vectorize=vectorize)
        consistency = torch.stack([symmetric_kl(logits[i], logits[j]) for i, j in pairs]).mean()
        return Aggregate(objective=self.weight * consistency, logged={"consistency_loss": consistency.detach()})
