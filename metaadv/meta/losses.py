"""The loss stage of a meta-step: adapt to each task's support set, then its query loss at the adapted point,
looped over tasks or vmapped (``MetaConfig.batched``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks.spec import group_by_batch_key, run_grouped
from ..batchnorm import update_running_stats
from ..config import MetaConfig
from ..functional import Params, call, model_fn
from ..tasks import AttackTask
from ..types import ModelFn
from ..views import stack_rows
from .batched import pick_buffers, pick_tasks, task_cross_entropy, task_forward, task_model_fn, vectorized
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
    adapted copy. The query forward passes update the
    BatchNorm running statistics in ``buffers`` once per task, in task order.

    The inner loop is ``config``'s (``inner_steps``, ``inner_lr``, ``inner_params``, ``proximal``), first order
    iff ``config.first_order_at(step)`` (``step``: the 0-based meta-step index, needed when
    ``config.first_order_until > 0``), as ``options`` change it (``inner_loop``: Meta-SGD's learned step sizes,
    per-step BatchNorm statistics; ``task_loop``: FiLM task codes).

    Batched (``config.batched``; all tasks need equal support and query sizes): the inner loop is
    ``adapt_tasks`` (``adapt``'s update rule on the T copies at once), the query forward pass runs the T
    adapted copies at once (``batched.task_forward``), with the running-statistics updates applied after it,
    task by task, and the query attacks against the adapted copies run one call per attack family. Equal to
    the looped stage up to float rounding (and the random numbers drawn: meta-dropout's masks, random starts).
    """
    check_given(config, options)
    settings = {"steps": config.inner_steps, "lr": config.inner_lr, "first_order": config.first_order_at(step),
                "inner_params": config.inner_params, "proximal": config.proximal}  # fmt: skip
    loop = InnerLoop(settings, buffers, buffers, buffers)
    for option in options:
        loop = option.inner_loop(loop)
    for option in options:
        loop = option.task_loop(model, params, tasks, sets, loop)
    if config.batched:
        return _batched_losses(model, params, tasks, sets, config, loop)
    out = []
    for i, (task, s) in enumerate(zip(tasks, sets, strict=True)):
        task_loop = loop.for_task(i)
        adapted = adapt(model, s.support, s.support_y, params=params, **task_loop.settings)
        query = s.query
        if query is None:
            with attack_precision(config, s.query_clean.device):
                query = task(model_fn(model, adapted, task_loop.attack_buffers), s.query_clean, s.query_y, check=False)
        out.append(query_loss(model, adapted, task_loop.query_buffers, query, s.query_clean, s.query_y,
                              config.clean_weight))  # fmt: skip
    loss, adv_loss, adv_acc = (torch.stack(v) for v in zip(*out, strict=True))
    return loss, adv_loss, adv_acc


def _batched_losses(
    model: nn.Module,
    params: Params,
    tasks: Sequence[AttackTask],
    sets: Sequence[TaskSets],
    config: MetaConfig,
    loop: InnerLoop,
) -> tuple[Tensor, Tensor, Tensor]:
    loop = loop.stacked()  # per-task buffers as (T, *shape) tensors
    support = stack_rows([s.support for s in sets])  # (T, S, C, H, W)
    support_y = stack_rows([s.support_y for s in sets])  # (T, S)
    vectorize = vectorized(config.vmap_tasks, support.device)
    adapted = adapt_tasks(model, support, support_y, params=params, batched_buffers=loop.per_task,
                          vectorize=vectorize, **loop.settings)  # fmt: skip
    query_clean, query_y = stack_rows([s.query_clean for s in sets]), stack_rows([s.query_y for s in sets])
    query = _adapted_queries(model, adapted, loop, tasks, sets, config, vectorize)  # (T, Q, C, H, W)
    x = torch.cat([query, query_clean], 1) if config.clean_weight > 0 else query
    logits, batch_stats = task_forward(model, adapted, loop.query_buffers, x, batched={*adapted, *loop.per_task},
                                       record=True, vectorize=vectorize)  # (T, Q or 2Q, K)  # fmt: skip
    update_running_stats(model, loop.query_buffers, batch_stats)
    adv_logits = logits[:, : query_y.shape[1]]
    adv_loss = loss = task_cross_entropy(adv_logits, query_y)  # (T,)
    if config.clean_weight > 0:
        clean = task_cross_entropy(logits[:, query_y.shape[1] :], query_y)
        loss = (1 - config.clean_weight) * adv_loss + config.clean_weight * clean
    adv_acc = (adv_logits.argmax(-1) == query_y).float().mean(1)
    return loss, adv_loss.detach(), adv_acc.detach()


def _adapted_queries(
    model: nn.Module, adapted: Params, loop: InnerLoop, tasks: Sequence[AttackTask], sets: Sequence[TaskSets],
    config: MetaConfig, vectorize: bool,
) -> Tensor:  # fmt: skip
    """Each task's adversarial query set (T, Q, C, H, W): as crafted, or (None) crafted now against the task's
    adapted copy, one attack call per attack family (``group_by_batch_key``) for all its tasks at once (a task
    with a runner, a persistent generator, alone)."""
    missing = [i for i, s in enumerate(sets) if s.query is None and tasks[i].runner is None]
    queries = {i: s.query for i, s in enumerate(sets) if s.query is not None}
    with attack_precision(config, sets[0].query_clean.device):
        for i in (i for i, s in enumerate(sets) if s.query is None and tasks[i].runner is not None):
            queries[i] = tasks[i](_against(model, adapted, loop, [i], vectorize), sets[i].query_clean, sets[i].query_y)
        for group in group_by_batch_key([tasks[i].attack for i in missing]):
            group = [missing[j] for j in group]
            target = _against(model, adapted, loop, group, vectorize)
            crafted = run_grouped([tasks[i].attack for i in group], target, [sets[i].query_clean for i in group],
                                  [sets[i].query_y for i in group])  # fmt: skip
            queries.update(zip(group, crafted, strict=True))
    return stack_rows([queries[i] for i in range(len(sets))])


def _against(model: nn.Module, adapted: Params, loop: InnerLoop, group: list[int], vectorize: bool) -> ModelFn:
    """The attack's model for the adapted copies of the tasks ``group``, at their attack buffers."""
    buffers = pick_buffers(loop.attack_buffers, loop.per_task, group)
    batched = {*adapted, *loop.per_task}
    return task_model_fn(model, pick_tasks(adapted, group), buffers, len(group), batched=batched, vectorize=vectorize)


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
