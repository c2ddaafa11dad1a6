"""The outer loop's unit: one meta-step's loss over a meta-batch of attack tasks.

For each task i with support set S_i and query set Q_i (adversarial examples of its attack):

    theta_i' = theta - alpha * grad_theta L(f_theta, S_i)            (inner loop, ``adapt``)
    L_meta   = sum_i w_i * L(f_{theta_i'}, Q_i),   w_i = 1/n          (query loss at the adapted point)

and the meta-optimizer steps theta along grad_theta L_meta (second order unless ``first_order``).
The inner loop's options (head only, proximal term, first-order schedule, Meta-SGD step sizes) come
from ``MetaConfig``; see docs/meta_options.md.
A meta-step has two stages: ``craft_task_sets`` (the attacks) and ``task_losses`` (inner loop and query
loss), each either looped over tasks or task-batched (``MetaConfig.batched``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from .attacks.spec import group_by_batch_key, run_grouped
from .attention import task_statistics, weighted_meta_loss
from .batchnorm import BatchNormFromPrimitives, update_running_stats
from .config import MetaConfig
from .film import task_code, with_code
from .functional import ModelFn, Params, call, clone_buffers, model_fn
from .inner import adapt, adapt_tasks
from .tasks import AttackTask, split_support_query

if TYPE_CHECKING:
    from .attention import TaskAttention
    from .reuse import AdversarialPool
    from .step_bn import StepBatchNorm
    from .task_bn import TaskBatchNorm

__all__ = ["MetaBatchLoss", "TaskSets", "attack_precision", "craft_task_sets", "meta_batch_loss", "task_losses"]


@dataclass(frozen=True)
class MetaBatchLoss:
    """The meta-loss of one meta-batch (with its graph to the meta-parameters) and per-task statistics."""

    loss: Tensor  # scalar, differentiable w.r.t. the meta-parameters
    task_names: tuple[str, ...]  # one per task, e.g. ("fgsm", "pgd_linf")
    task_specs: tuple[str, ...]  # canonical attack spec per task (eps included)
    query_loss: Tensor  # (n_tasks,) adversarial query loss of each adapted copy, detached
    query_acc: Tensor  # (n_tasks,) adversarial query accuracy of each adapted copy, detached
    task_weights: Tensor | None = None  # (n_tasks,) task attention's weights a (None: uniform 1/n), detached
    attention_loss: Tensor | None = None  # scalar, the attention network's loss (with its graph to the network)


@dataclass(frozen=True)
class TaskSets:
    """One task's examples for the loss stage."""

    support: Tensor  # (S, C, H, W) adversarial support examples
    support_y: Tensor  # (S,)
    query: Tensor | None  # (Q, C, H, W) adversarial query examples; None: crafted against the adapted copy
    query_clean: Tensor  # (Q, C, H, W) the clean query examples
    query_y: Tensor  # (Q,)
    support_clean: Tensor | None = None  # (S, C, H, W) the clean support examples (read by task_encoding='support')


def meta_batch_loss(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[AttackTask],
    x: Tensor,
    y: Tensor,
    config: MetaConfig,
    *,
    step: int | None = None,
    inner_lr: Mapping[str, Tensor] | None = None,
    pool: AdversarialPool | None = None,
    attention: TaskAttention | None = None,
    task_bn: TaskBatchNorm | None = None,
    step_bn: StepBatchNorm | None = None,
) -> MetaBatchLoss:
    """Compute the meta-loss of ``tasks`` on the clean batch ``x`` (B, C, H, W), ``y`` (B,).

    The batch is split into disjoint support/query chunks, one per task. Support examples are crafted
    against the meta-parameters; query examples against the meta-parameters (``query_attack="meta"``,
    the default: both sets of a task come from one attack call, and with a small inner step the adapted
    copy is close enough to theta that the attack transfers) or against each adapted copy
    (``"adapted"``: exact for many inner steps, one more attack per task). Only the query forward
    passes update ``buffers`` (BatchNorm running statistics); attacks and the inner loop use scratch copies.
    With ``config.batched`` both stages run task-batched (see ``craft_task_sets`` and ``task_losses``).
    ``step``, ``inner_lr`` and ``step_bn`` are ``task_losses``'s, ``pool`` is ``craft_task_sets``'s.

    ``attention`` (``MetaConfig.task_attention``, see docs/meta_options.md): the loss is
    sum_i stop(a_i) * L_i with a = ``attention(type indices, task statistics)`` instead of the mean, and
    ``attention_loss`` is the attention network's own loss; if a statistic is not finite the weights are
    uniform for this step (``meta_train`` then skips it).

    ``task_bn`` (``MetaConfig.task_bn``, see ``task_bn.py``): each task's support and query examples also
    update its type's own BatchNorm statistics, at the meta-parameters, in a forward pass of their own.

    ``config.task_encoding`` (``model`` a ``film.FiLM`` or holding one, looped only): each task's inner loop and
    query loss run at its task code: ``"type"``, its type's embedding (its attacks target the model at that code
    too); ``"support"``, inferred from its support set's perturbations (attacks target the unknown code 0).
    Task attention's statistics and ``task_bn``'s updates run at the model's own (zero) code.
    """
    sets = craft_task_sets(model, params, buffers, tasks, x, y, config, pool=pool, step=step)
    losses, query_loss, query_acc = task_losses(model, params, buffers, tasks, sets, config, step=step,
                                                inner_lr=inner_lr, step_bn=step_bn)  # fmt: skip
    if task_bn is not None:
        for task, sets_i in zip(tasks, sets, strict=True):
            seen = sets_i.support if sets_i.query is None else torch.cat([sets_i.support, sets_i.query])
            task_bn.update(model, params, task.type_index, seen)
    weights = attention_loss = None
    if attention is not None:
        stats = _attention_statistics(model, params, buffers, sets, query_loss, query_acc)
        if bool(torch.isfinite(stats).all()):
            types = torch.tensor([t.type_index for t in tasks], device=stats.device)
            weights = attention(types, stats)
            attention_loss = attention.attention_loss(weights, losses)
        else:
            weights = torch.full_like(losses, 1 / len(tasks))
            attention_loss = losses.detach().sum() * 0.0  # NaN if a loss is: meta_train then skips the step
    return MetaBatchLoss(
        loss=losses.mean() if weights is None else weighted_meta_loss(weights, losses),
        task_names=tuple(t.name for t in tasks),
        task_specs=tuple(t.attack.spec for t in tasks),
        query_loss=query_loss,
        query_acc=query_acc,
        task_weights=None if weights is None else weights.detach(),
        attention_loss=attention_loss,
    )


@torch.no_grad()
def _attention_statistics(
    model: nn.Module, params: Params, buffers: Params, sets: Sequence[TaskSets], query_loss: Tensor, query_acc: Tensor
) -> Tensor:
    """Task attention's (T, 4) statistics: the support and query loss and query accuracy at the meta-parameters
    (forward passes in the model's mode on scratch BatchNorm statistics), with the adapted copies' query
    loss and accuracy. Queries crafted against the adapted copies (``query_attack="adapted"``) are not
    kept, so there the query statistics before adaptation are on the clean query examples."""
    scratch = clone_buffers(buffers)
    before = []
    for s in sets:
        support_logits = call(model, params, scratch, s.support)
        query = s.query if s.query is not None else s.query_clean
        query_logits = call(model, params, scratch, query)
        q_acc = (query_logits.argmax(1) == s.query_y).float().mean()
        before.append(torch.stack([F.cross_entropy(query_logits, s.query_y),
                                   F.cross_entropy(support_logits, s.support_y), q_acc]))  # fmt: skip
    q_loss, s_loss, q_acc = torch.stack(before).unbind(1)
    return task_statistics(query_loss_before=q_loss, query_loss_after=query_loss, support_loss=s_loss,
                           query_acc_before=q_acc, query_acc_after=query_acc)  # fmt: skip


def craft_task_sets(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[AttackTask],
    x: Tensor,
    y: Tensor,
    config: MetaConfig,
    *,
    pool: AdversarialPool | None = None,
    step: int | None = None,
) -> list[TaskSets]:
    """The attack stage: each task's support set (and with ``query_attack="meta"`` its query set) crafted
    against the meta-parameters, from disjoint chunks of ``x`` (B, C, H, W), ``y`` (B,).

    Looped: one attack call per task, on its support and query examples together. Batched: one call per
    group of tasks whose attacks differ only in eps (``Attack.batch_key``), on the group's concatenated
    examples with a per-example eps; other attacks (torchattacks, msd, attacks without eps) and tasks with a
    ``runner`` (persistent generators, ``tasks.PersistentGenerators``) run per task.
    The batched calls skip the value checks that read back from the device (``run_grouped``), and in
    training mode the model's BatchNorm normalizes with statistics of the whole group's batch, and random
    starts are drawn for the group at once: batched and looped crafting agree exactly only for
    deterministic attacks on an eval-mode model.

    ``pool`` (``MetaConfig.reuse_every > 1``, see ``reuse.py``): a task whose key (type, occurrence) has sets
    in the pool crafted fewer than ``pool.every`` steps before meta-step ``step`` takes those and is not attacked;
    the sets crafted here are stored in the pool.
    """
    chunks = split_support_query(x, y, len(tasks), config.support_size, config.query_size)
    keys = pool.keys([t.type_index for t in tasks]) if pool is not None else []
    reused = {i: pool.fresh(key, step) for i, key in enumerate(keys)} if pool is not None else {}
    todo = [i for i in range(len(tasks)) if reused.get(i) is None]
    target = model_fn(model, params, buffers)
    both = config.query_attack == "meta"
    inputs = {i: torch.cat([chunks[i][0], chunks[i][2]]) if both else chunks[i][0] for i in todo}
    labels = {i: torch.cat([chunks[i][1], chunks[i][3]]) if both else chunks[i][1] for i in todo}
    adv: dict[int, Tensor] = {}  # task index -> adversarial examples of its inputs
    with attack_precision(config, x.device):
        if config.batched:
            grouped = [i for i in todo if tasks[i].runner is None]
            adv = {i: tasks[i](target, inputs[i], labels[i]) for i in todo if tasks[i].runner is not None}
            for group in group_by_batch_key([tasks[i].attack for i in grouped]):
                group = [grouped[j] for j in group]
                crafted = run_grouped([tasks[i].attack for i in group], target, [inputs[i] for i in group],
                                      [labels[i] for i in group])  # fmt: skip
                adv.update(zip(group, crafted, strict=True))
        else:
            adv = {i: tasks[i](_attack_target(model, params, buffers, tasks[i], config) or target, inputs[i], labels[i])
                   for i in todo}  # fmt: skip
    n = config.support_size
    sets = [
        reused.get(i) or TaskSets(adv[i][:n], ys, adv[i][n:] if both else None, xq, yq, xs)
        for i, (xs, ys, xq, yq) in enumerate(chunks)
    ]
    if pool is not None:
        for i in todo:
            pool.put(keys[i], step, sets[i])
    return sets


def task_losses(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[AttackTask],
    sets: Sequence[TaskSets],
    config: MetaConfig,
    *,
    step: int | None = None,
    inner_lr: Mapping[str, Tensor] | None = None,
    step_bn: StepBatchNorm | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss stage: adapt to each task's support set, then its query loss at the adapted point.

    Returns (loss (T,) differentiable w.r.t. ``params``, adversarial query loss (T,) detached, adversarial
    query accuracy (T,) detached). A query set that is None is crafted with the task's attack against the
    adapted copy (one attack call per task, looped in both modes). The query forward passes update the
    BatchNorm running statistics in ``buffers`` once per task, in task order.

    The inner loop is ``config``'s (``inner_steps``, ``inner_params``, ``proximal``), first order iff
    ``config.first_order_at(step)`` (``step``: the 0-based meta-step index, needed when
    ``config.first_order_until > 0``). ``inner_lr``: Meta-SGD's step sizes, name -> tensor shaped like each
    adapted parameter (see ``inner.init_inner_lr``); required when ``config.learn_inner_lr``, else
    ``config.inner_lr`` is used. ``step_bn`` (``config.per_step_bn``, see ``step_bn.py``; required then, refused
    otherwise): the support pass of inner step k updates statistics set k (set 0: ``buffers``) and the query
    pass set K, instead of scratch copies and ``buffers``.

    Batched (``config.batched``; all tasks need equal support and query sizes): the inner loop is
    ``adapt_tasks`` (``adapt``'s update rule vmapped over tasks) and the query loss is vmapped, with
    BatchNorm computed from primitives in both (native BatchNorm's second-order gradients are wrong under
    vmap) and the running-statistics updates applied after the vmapped query pass, task by task. Equal to
    the looped stage up to float rounding.
    """
    if config.learn_inner_lr and inner_lr is None:
        raise ValueError("MetaConfig.learn_inner_lr=True needs the learned step sizes: pass inner_lr=")
    if (None if step_bn is None else step_bn.steps) != (config.inner_steps if config.per_step_bn else None):
        raise ValueError(
            f"step_bn must be a StepBatchNorm for inner_steps={config.inner_steps} with MetaConfig.per_step_bn=True "
            f"and None otherwise (per_step_bn={config.per_step_bn}), got {step_bn!r}"
        )
    bn_sets = step_bn.sets(buffers) if step_bn is not None else [buffers]  # forward passes at theta^(k) use set k
    inner = {
        "steps": config.inner_steps,
        "lr": config.inner_lr if inner_lr is None else inner_lr,
        "first_order": config.first_order_at(step),
        "inner_params": config.inner_params,
        "proximal": config.proximal,
        **({"buffers": bn_sets[:-1]} if step_bn is not None else {}),
    }
    if config.batched:
        return _batched_losses(model, params, buffers, tasks, sets, config, inner)
    out = []
    for task, s in zip(tasks, sets, strict=True):
        task_inner, query_buffers, attack_buffers = _encoded(model, params, buffers, bn_sets, inner, task, s, config)
        adapted = adapt(model, s.support, s.support_y, params=params, **task_inner)
        query = s.query
        if query is None:
            with attack_precision(config, s.query_clean.device):
                query = task(model_fn(model, adapted, attack_buffers), s.query_clean, s.query_y)
        out.append(_query_loss(model, adapted, query_buffers, query, s.query_clean, s.query_y, config.clean_weight))
    loss, query_loss, query_acc = (torch.stack(v) for v in zip(*out, strict=True))
    return loss, query_loss, query_acc


def _attack_target(
    model: nn.Module, params: Params, buffers: Params, task: AttackTask, config: MetaConfig
) -> ModelFn | None:
    """With ``task_encoding="type"``, the model at the task's type code for its attack (None: the shared target;
    ``"support"`` attacks the model at the unknown code 0, as the code is inferred from the attack's examples)."""
    if config.task_encoding != "type":
        return None
    return model_fn(model, params, with_code(buffers, task_code(model, params, type_index=task.type_index).detach()))


def _encoded(
    model: nn.Module,
    params: Params,
    buffers: Params,
    bn_sets: Sequence[Params],
    inner: Mapping[str, Any],
    task: AttackTask,
    sets: TaskSets,
    config: MetaConfig,
) -> tuple[Mapping[str, Any], Params, Params]:
    """One task's inner-loop options, query-pass buffers and buffers for an attack on the adapted copy.

    With ``config.task_encoding`` (film.py) each holds the task's code, computed from ``params`` (its graph kept:
    the meta-gradient reaches the embedding or encoder): the inner loop on scratch copies of ``buffers`` (or on
    the per-step sets), the query pass on a view of ``bn_sets[-1]`` (its running statistics still update in
    place), the attack with the code detached. Without it: ``inner``, ``bn_sets[-1]`` and ``buffers``.
    """
    if config.task_encoding == "none":
        return inner, bn_sets[-1], buffers
    if config.task_encoding == "type":
        code = task_code(model, params, type_index=task.type_index)
    else:
        code = task_code(model, params, support_adv=sets.support, support_clean=sets.support_clean)
    steps = inner.get("buffers")
    coded = [with_code(b, code) for b in steps] if steps is not None else with_code(clone_buffers(buffers), code)
    return {**inner, "buffers": coded}, with_code(bn_sets[-1], code), with_code(buffers, code.detach())


def _batched_losses(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[AttackTask],
    sets: Sequence[TaskSets],
    config: MetaConfig,
    inner: Mapping[str, Any],
) -> tuple[Tensor, Tensor, Tensor]:
    support = torch.stack([s.support for s in sets])  # (T, S, C, H, W)
    support_y = torch.stack([s.support_y for s in sets])  # (T, S)
    adapted = adapt_tasks(model, support, support_y, params=params, buffers=buffers, **inner)
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
            out = _query_loss(model, theta, scratch, xq_adv, xq, yq, config.clean_weight)
        return out, bn.batch_stats

    (loss, query_loss, query_acc), batch_stats = vmap(one_query)(adapted, query, query_clean, query_y)
    update_running_stats(model, buffers, batch_stats)
    return loss, query_loss, query_acc


def attack_precision(config: MetaConfig, device: torch.device) -> torch.autocast:
    """The context the attacks run in: bf16 autocast on ``device`` if ``config.autocast_attacks``, else a no-op.

    Under autocast the model's convolutions and matrix products run in bfloat16; the perturbation, its
    projection and the returned examples stay float32, so every bound holds exactly as without it.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast_attacks)


def _query_loss(
    model: nn.Module, params: Params, buffers: Params, x_adv: Tensor, x: Tensor, y: Tensor, clean_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, adversarial loss detached, adversarial accuracy) of one task's query set (Q, C, H, W) at ``params``."""
    if clean_weight > 0:
        logits = call(model, params, buffers, torch.cat([x_adv, x]))
        adv_logits, clean_logits = logits[: len(x)], logits[len(x) :]
        adv_loss = F.cross_entropy(adv_logits, y)
        loss = (1 - clean_weight) * adv_loss + clean_weight * F.cross_entropy(clean_logits, y)
    else:
        adv_logits = call(model, params, buffers, x_adv)
        adv_loss = loss = F.cross_entropy(adv_logits, y)
    return loss, adv_loss.detach(), (adv_logits.argmax(1) == y).float().mean().detach()
