"""The outer loop's unit: one meta-step's loss over a meta-batch of attack tasks.

For each task i with support set S_i and query set Q_i (adversarial examples of its attack):

    theta_i' = theta - alpha * grad_theta L(f_theta, S_i)            (inner loop, ``adapt``)
    L_meta   = sum_i w_i * L(f_{theta_i'}, Q_i),   w_i = 1/n          (query loss at the adapted point)

and the meta-optimizer steps theta along grad_theta L_meta (second order unless ``first_order``).
A meta-step reads top to bottom: bind the tasks, craft their sets (``craft_task_sets``), adapt and query
(``task_losses``), let options observe the sets, aggregate the task losses. Meta options (``options/``) act
only through their hooks; docs/meta_options.md gives each one's equation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..config import MetaConfig
from ..functional import Params
from ..tasks import AttackTask
from .craft import craft_task_sets
from .losses import task_losses
from .options import check_given
from .options.attention import weighted_meta_loss
from .options.base import MetaOption

__all__ = ["MetaBatchLoss", "meta_batch_loss"]


@dataclass(frozen=True)
class MetaBatchLoss:
    """The meta-loss of one meta-batch (with its graph to the meta-parameters) and per-task statistics."""

    loss: Tensor  # scalar, differentiable w.r.t. the meta-parameters
    task_names: tuple[str, ...]  # one per task, e.g. ("fgsm", "pgd_linf")
    task_specs: tuple[str, ...]  # canonical attack spec per task (eps included)
    query_loss: Tensor  # (n_tasks,) adversarial query loss of each adapted copy, detached
    query_acc: Tensor  # (n_tasks,) adversarial query accuracy of each adapted copy, detached
    objective: Tensor | None = None  # scalar added to the loss when back-propagating (an option's own loss)
    logged: dict[str, Tensor] = field(default_factory=dict)  # options' tensors for the step's record
    record: dict[str, Any] = field(default_factory=dict)  # options' host-side entries for the step's record

    @property
    def task_weights(self) -> Tensor | None:
        """(n_tasks,) task attention's weights (None: uniform 1/n), detached."""
        return self.logged.get("task_weights")


def meta_batch_loss(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[AttackTask],
    x: Tensor,
    y: Tensor,
    config: MetaConfig,
    *,
    options: Sequence[MetaOption] = (),
    step: int | None = None,
) -> MetaBatchLoss:
    """Compute the meta-loss of ``tasks`` on the clean batch ``x`` (B, C, H, W), ``y`` (B,).

    The batch is split into disjoint support/query chunks, one per task. Support examples are crafted
    against the meta-parameters; query examples against the meta-parameters (``query_attack="meta"``,
    the default: both sets of a task come from one attack call, and with a small inner step the adapted
    copy is close enough to theta that the attack transfers) or against each adapted copy
    (``"adapted"``: exact for many inner steps, one more attack per task). Only the query forward
    passes update ``buffers`` (BatchNorm running statistics); attacks and the inner loop use scratch copies.
    With ``config.batched`` both stages run task-batched (see ``craft_task_sets`` and ``task_losses``).

    ``options``: the meta options ``config`` turns on (``options.build``; ValueError if one is missing or
    extra), acting through their hooks; ``step``: the 0-based meta-step index (needed by the first-order
    schedule and the reuse pool).
    """
    check_given(config, options)
    for option in options:
        tasks = option.bind(tasks)
    sets = craft_task_sets(model, params, buffers, tasks, x, y, config, options=options, step=step)
    losses, query_loss, query_acc = task_losses(model, params, buffers, tasks, sets, config, options=options,
                                                step=step)  # fmt: skip
    for option in options:
        option.observe(model, params, tasks, sets)
    loss, objective, logged, record = losses.mean(), None, {}, {}
    for option in options:
        found = option.aggregate(model, params, buffers, tasks, sets, losses, query_loss, query_acc)
        if found is not None:
            loss = loss if found.weights is None else weighted_meta_loss(found.weights, losses)
            if found.objective is not None:
                objective = found.objective if objective is None else objective + found.objective
            logged |= found.logged
        logged |= option.logged(model, params, buffers, tasks, sets, query_acc)
        record |= option.record()
    return MetaBatchLoss(
        loss=loss,
        task_names=tuple(t.name for t in tasks),
        task_specs=tuple(t.attack.spec for t in tasks),
        query_loss=query_loss,
        query_acc=query_acc,
        objective=objective,
        logged=logged,
        record=record,
    )
