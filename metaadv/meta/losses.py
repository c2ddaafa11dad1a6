"""The loss stage of a meta-step: adapt to each task's support set, then its query loss at the adapted point,
looped over tasks or vmapped (``MetaConfig.batched``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ..attacks.spec import run_grouped
from ..batchnorm import BatchNormFromPrimitives, update_running_stats
from ..config import MetaConfig
from ..functional import Params, call, clone_buffers, model_fn
from ..tasks import AttackTask
from .craft import attack_precision
from .inner import adapt, adapt_tasks
from .options import check_given
from .options.base import InnerLoop, MetaOption
from .sets import TaskSets

__all__ = ["query_loss", "task_losses"]


def task_losses(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[AttackTask],
    sets: Sequence[TaskSets],
    config: MetaConfig,
    *,
    options: Sequence[MetaOption] = (),
    step: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adapt to each task's support set, then its query loss at the adapted point.

    Returns (loss (T,) differentiable w.r.t. ``params``, adversarial query loss (T,) detached, adversarial
    query accuracy (T,) detached). A query set that is None is crafted with the task's attack against the
    adapted copy (one attack call per task, looped in both modes). The query forward passes update the
    BatchNorm running statistics in ``buffers`` once per task, in task order.

    The inner loop is ``config``'s (``inner_steps``, ``inner_lr``, ``inner_params``, ``proximal``), first order
    iff ``config.first_order_at(step)`` (``step``: the 0-based meta-step index, needed when
    ``config.first_order_until > 0``), as ``options`` change it (``inner_loop``: Meta-SGD's learned step sizes,
    per-step BatchNorm statistics; ``task_loop``: FiLM task codes).

    Batched (``config.batched``; all tasks need equal support and query sizes): the inner loop is
    ``adapt_tasks`` (``adapt``'s update rule vmapped over tasks) and the query loss is vmapped, with
    BatchNorm computed from primitives in both (native BatchNorm's second-order gradients are wrong under
    vmap) and the running-statistics updates applied after the vmapped query pass, task by task. Equal to
    the looped stage up to float rounding.
    """
    check_given(config, options)
    settings = {"steps": config.inner_steps, "lr": config.inner_lr, "first_order": config.first_order_at(step),
                "inner_params": config.inner_params, "proximal": config.proximal}  # fmt: skip
    loop = InnerLoop(settings, buffers, buffers, buffers)
    for option in options:
        loop = option.inner_loop(loop)
    if config.batched:
        return _batched_losses(model, params, buffers, tasks, sets, config, loop)
    out = []
    for task, s in zip(tasks, sets, strict=True):
        task_loop = loop
        for option in options:
            task_loop = option.task_loop(model, params, task, s, task_loop)
        adapted = adapt(model, s.support, s.support_y, params=params, **task_loop.settings)
        query = s.query
        if query is None:
            with attack_precision(config, s.query_clean.device):
                query = task(model_fn(model, adapted, task_loop.attack_buffers), s.query_clean, s.query_y)
        out.append(query_loss(model, adapted, task_loop.query_buffers, query, s.query_clean, s.query_y,
                              config.clean_weight))  # fmt: skip
    loss, adv_loss, adv_acc = (torch.stack(v) for v in zip(*out, strict=True))
    return loss, adv_loss, adv_acc


def _batched_losses(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[AttackTask],
    sets: Sequence[TaskSets],
    config: MetaConfig,
    loop: InnerLoop,
) -> tuple[Tensor, Tensor, Tensor]:
    support = torch.stack([s.support for s in sets])  # (T, S, C, H, W)
    support_y = torch.stack([s.support_y for s in sets])  # (T, S)
    adapted = adapt_tasks(model, support, support_y, params=params, buffers=buffers, **loop.settings)
    with attack_precision(config, support.device):
        queries = [
            s.query if s.query is not None
            else run_grouped([task.attack], model_fn(model, {k: v[i] for k, v in adapted.items()}, buffers),
                             [s.query_clean], [s.query_y])[0]
            for i, (task, s) in enumerate(zip(tasks, sets, strict=True))
        ]  # fmt: skip
    query = torch.stack(queries)  # (T, Q, C, H, W); adapted: name -> (T, *shape)
    query_clean = torch.stack([s.query_clean for s in sets])
    query_y = torch.stack([s.query_y for s in sets])  # (T, Q)
    scratch = clone_buffers(buffers)  # read by the vmapped pass; ``buffers`` are updated after it

    def one_query(theta: Params, xq_adv: Tensor, xq: Tensor, yq: Tensor) -> tuple:
        with BatchNormFromPrimitives(scratch) as bn:
            out = query_loss(model, theta, scratch, xq_adv, xq, yq, config.clean_weight)
        return out, bn.batch_stats

    (loss, adv_loss, adv_acc), batch_stats = vmap(one_query)(adapted, query, query_clean, query_y)
    update_running_stats(model, buffers, batch_stats)
    return loss, adv_loss, adv_acc


def query_loss(
    model: nn.Module, params: Params, buffers: Params, x_adv: Tensor, x: Tensor, y: Tensor, clean_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, adversarial loss detached, adversarial accuracy detached) of one task's query set (Q, C, H, W)
    at ``params``: ``(1 - w) * CE(f(x_adv), y) + w * CE(f(x), y)`` with w = ``clean_weight``."""
    if clean_weight > 0:
        logits = call(model, params, buffers, torch.cat([x_adv, x]))
        adv_logits, clean_logits = logits[: len(x)], logits[len(x) :]
        adv_loss = F.cross_entropy(adv_logits, y)
        loss = (1 - clean_weight) * adv_loss + clean_weight * F.cross_entropy(clean_logits, y)
    else:
        adv_logits = call(model, params, buffers, x_adv)
        adv_loss = loss = F.cross_entropy(adv_logits, y)
    return loss, adv_loss.detach(), (adv_logits.argmax(1) == y).float().mean().detach()
