"""Per-task BatchNorm statistics (``MetaConfig.task_bn``): running statistics kept per attack type.

A model with BatchNorm normalizes at test time with running statistics averaged over everything it
trained on: with several attack types, a mixture of their feature distributions. With ``task_bn`` the
meta-training also keeps, for each attack type k of the distribution, its own running statistics

    mu_k, var_k <- (1 - m) * (mu_k, var_k) + m * batch statistics of f_theta on the adversarial examples of
                   each task of type k (its support and query sets, at the meta-parameters theta)

(m: each layer's BatchNorm momentum), with a forward pass of its own (no gradient) that touches neither
the shared statistics nor another type's: the shared (meta) statistics are updated exactly as without the
option, so training is unchanged. The inner loop always normalizes with the support batch's own
statistics (training mode), which is its per-task adaptation of BatchNorm.

At test time (``metaadv.evaluate(..., adapt_methods=("task_bn",), task_bn=result.task_bn)``), an attack is
given the statistics of the known type nearest to its few-shot adversarial support set: per layer and
channel, the KL divergence KL(N(mu_s, var_s) || N(mu_k, var_k)) between the support's statistics and type
k's, summed. For an attack the model trained on, that is usually its own type; for an unseen one, the
known type whose features look most alike. The alternatives are the meta statistics (zero-shot, the
default) and the support set's own statistics (adapt method ``"bn"``, optionally mixed with the meta
statistics by ``bn_momentum``). docs/meta_options.md compares them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...functional import Params, batchnorm_layers, batchnorm_training, call, clone_buffers
from ...tasks import AttackTask
from ..sets import TaskSets
from .base import MetaOption, OptionSetup

__all__ = ["TaskBatchNorm", "bn_divergence"]


class TaskBatchNorm(MetaOption):
    """Running BatchNorm statistics per attack type, besides the model's own (meta) statistics.

    Args:
        model: the model being meta-trained (its BatchNorm layers define which buffers are kept).
        buffers: the model's buffers; each type starts from a copy of them.
        names: the attack types' names, in the order of their type indices (``AttackDistribution.types``).
    """

    def __init__(self, model: nn.Module, buffers: Mapping[str, Tensor], names: Sequence[str]) -> None:
        if not batchnorm_layers(model):
            raise ValueError(
                f"MetaConfig.task_bn keeps per-type BatchNorm statistics, but {type(model).__name__} has no "
                "BatchNorm layer tracking running statistics"
            )
        self.names = list(names)
        self.stats: list[Params] = [clone_buffers(dict(buffers)) for _ in self.names]  # type index -> buffers

    field, name, artifact_name, distributed, volatile = "task_bn", "task_bn", "task_bn", False, True

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.task_bn

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> TaskBatchNorm:
        return cls(setup.model, setup.buffers, [a.name for a in setup.tasks.types])

    def observe(self, model: nn.Module, params: Params, tasks: Sequence[AttackTask], sets: Sequence[TaskSets]) -> None:
        """Each task's support and query examples update its type's statistics, at the meta-parameters."""
        for task, s in zip(tasks, sets, strict=True):
            self.update(
                model, params, task.type_index, s.support if s.query is None else torch.cat([s.support, s.query])
            )

    def artifact(self) -> TaskBatchNorm:
        return self

    @classmethod
    def save_artifact(cls, artifact: TaskBatchNorm) -> dict[str, Any]:
        return artifact.state_dict()

    @classmethod
    def load_artifact(cls, model: nn.Module, saved: Mapping[str, Any]) -> TaskBatchNorm:
        stats = cls(model, dict(model.named_buffers()), saved["names"])
        stats.load_state_dict(saved)
        return stats

    @classmethod
    def eval_options(cls, artifact: TaskBatchNorm) -> dict[str, Any]:
        return {"task_bn": artifact}

    @torch.no_grad()
    def update(self, model: nn.Module, params: Params, type_index: int, x: Tensor) -> None:
        """Update type ``type_index``'s statistics with one forward pass of ``x`` (N, C, H, W) at ``params``,
        BatchNorm in training mode (its momentum), whatever the model's mode; nothing else changes."""
        with batchnorm_training(model):
            call(model, params, self.stats[type_index], x)

    def nearest(self, model: nn.Module, support_buffers: Mapping[str, Tensor]) -> int:
        """The type index whose statistics are nearest (``bn_divergence``) to ``support_buffers``."""
        divergences = torch.stack([bn_divergence(model, support_buffers, s) for s in self.stats])
        return int(divergences.argmin())

    def buffers(self, type_index: int) -> Params:
        """All model buffers with type ``type_index``'s BatchNorm statistics."""
        return self.stats[type_index]

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "stats": [{k: v.clone() for k, v in s.items()} for s in self.stats]}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        if list(saved["names"]) != self.names:
            raise ValueError(f"saved per-type statistics are for types {saved['names']}, this run has {self.names}")
        with torch.no_grad():
            for mine, theirs in zip(self.stats, saved["stats"], strict=True):
                for k, v in mine.items():
                    v.copy_(theirs[k])


def bn_divergence(model: nn.Module, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Sum over BatchNorm layers and channels of KL(N(mu_a, var_a) || N(mu_b, var_b)), a scalar >= 0."""
    total = torch.zeros(())
    for prefix, _ in batchnorm_layers(model):
        mu_a, var_a = a[prefix + "running_mean"], a[prefix + "running_var"].clamp_min(1e-12)
        mu_b, var_b = b[prefix + "running_mean"], b[prefix + "running_var"].clamp_min(1e-12)
        kl = 0.5 * (var_a / var_b + (mu_b - mu_a) ** 2 / var_b - 1 + torch.log(var_b / var_a))
        total = total + kl.sum().cpu()
    return total
