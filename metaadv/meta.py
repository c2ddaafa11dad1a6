"""The outer loop's unit: one meta-step's loss over a meta-batch of attack tasks.

For each task i with support set S_i and query set Q_i (adversarial examples of its attack):

    theta_i' = theta - alpha * grad_theta L(f_theta, S_i)            (inner loop, ``adapt``)
    L_meta   = sum_i w_i * L(f_{theta_i'}, Q_i),   w_i = 1/n          (query loss at the adapted point)

and the meta-optimizer steps theta along grad_theta L_meta (second order unless ``first_order``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MetaConfig
from .functional import Params, call, model_fn
from .inner import adapt
from .tasks import AttackTask, split_support_query

__all__ = ["MetaBatchLoss", "meta_batch_loss"]


@dataclass(frozen=True)
class MetaBatchLoss:
    """The meta-loss of one meta-batch (with its graph to the meta-parameters) and per-task statistics."""

    loss: Tensor  # scalar, differentiable w.r.t. the meta-parameters
    task_names: tuple[str, ...]  # one per task, e.g. ("fgsm", "pgd_linf")
    task_specs: tuple[str, ...]  # canonical attack spec per task (eps included)
    query_loss: Tensor  # (n_tasks,) adversarial query loss of each adapted copy, detached
    query_acc: Tensor  # (n_tasks,) adversarial query accuracy of each adapted copy, detached


def meta_batch_loss(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[AttackTask],
    x: Tensor,
    y: Tensor,
    config: MetaConfig,
) -> MetaBatchLoss:
    """Compute the meta-loss of ``tasks`` on the clean batch ``x`` (B, C, H, W), ``y`` (B,).

    The batch is split into disjoint support/query chunks, one per task. Support examples are crafted
    against the meta-parameters; query examples against the meta-parameters (``query_attack="meta"``,
    the default: both sets of a task come from one attack call, and with a small inner step the adapted
    copy is close enough to theta that the attack transfers) or against each adapted copy
    (``"adapted"``: exact for many inner steps, one more attack per task). Only the query forward
    passes update ``buffers`` (BatchNorm running statistics); attacks and the inner loop use scratch copies.
    """
    chunks = split_support_query(x, y, len(tasks), config.support_size, config.query_size)
    attack_meta = model_fn(model, params, buffers)
    n_support = config.support_size
    losses, accs = [], []
    for task, (xs, ys, xq, yq) in zip(tasks, chunks, strict=True):
        if config.query_attack == "meta":
            adv = task(attack_meta, torch.cat([xs, xq]), torch.cat([ys, yq]))
            xs_adv, xq_adv = adv[:n_support], adv[n_support:]
        else:
            xs_adv = task(attack_meta, xs, ys)
        adapted = adapt(
            model, xs_adv, ys, params=params, steps=config.inner_steps, lr=config.inner_lr,
            first_order=config.first_order,
        )  # fmt: skip
        if config.query_attack == "adapted":
            xq_adv = task(model_fn(model, adapted, buffers), xq, yq)
        if config.clean_weight > 0:
            logits = call(model, adapted, buffers, torch.cat([xq_adv, xq]))
            adv_logits, clean_logits = logits[: len(xq)], logits[len(xq) :]
            adv_loss = F.cross_entropy(adv_logits, yq)
            loss = (1 - config.clean_weight) * adv_loss + config.clean_weight * F.cross_entropy(clean_logits, yq)
        else:
            adv_logits = call(model, adapted, buffers, xq_adv)
            adv_loss = loss = F.cross_entropy(adv_logits, yq)
        losses.append((loss, adv_loss.detach()))
        accs.append((adv_logits.argmax(1) == yq).float().mean().detach())
    total = torch.stack([loss for loss, _ in losses]).mean()
    return MetaBatchLoss(
        loss=total,
        task_names=tuple(t.name for t in tasks),
        task_specs=tuple(t.attack.spec for t in tasks),
        query_loss=torch.stack([adv for _, adv in losses]),
        query_acc=torch.stack(accs),
    )
