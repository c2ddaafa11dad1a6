"""The attack stage of a meta-step: each task's adversarial support (and query) set, crafted against the
meta-parameters, looped over tasks or one attack call per attack family (``MetaConfig.batched``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..attacks.spec import group_by_batch_key, run_grouped
from ..config import MetaConfig
from ..functional import Params, model_fn
from ..tasks import AttackTask, split_support_query
from .options.base import MetaOption
from .sets import TaskSets

__all__ = ["attack_precision", "craft_task_sets"]


def attack_precision(config: MetaConfig, device: torch.device) -> torch.autocast:
    """The context the attacks run in: bf16 autocast on ``device`` if ``config.autocast_attacks``, else a no-op.

    Under autocast the model's convolutions and matrix products run in bfloat16; the perturbation, its
    projection and the returned examples stay float32, so every bound holds exactly as without it.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast_attacks)


def craft_task_sets(
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
) -> list[TaskSets]:
    """Each task's support set (and with ``query_attack="meta"`` its query set) crafted against the
    meta-parameters, from disjoint chunks of ``x`` (B, C, H, W), ``y`` (B,).

    Looped: one attack call per task, on its support and query examples together. Batched: one call per
    group of tasks whose attacks differ only in eps (``Attack.batch_key``), on the group's concatenated
    examples with a per-example eps; other attacks (torchattacks, msd, attacks without eps) and tasks with a
    ``runner`` (persistent generators) run per task.
    The batched calls skip the value checks that read back from the device (``run_grouped``), and in
    training mode the model's BatchNorm normalizes with statistics of the whole group's batch, and random
    starts are drawn for the group at once: batched and looped crafting agree exactly only for
    deterministic attacks on an eval-mode model.

    ``options`` act here through their ``reused`` / ``crafted`` hooks (sets taken instead of attacking: the
    reuse pool) and ``attack_target`` (the model a task's attack targets: FiLM type codes, looped only);
    ``step`` is the 0-based meta-step index they may read.
    """
    chunks = split_support_query(x, y, len(tasks), config.support_size, config.query_size)
    reused: dict[int, TaskSets] = {}
    for option in options:
        reused |= option.reused(tasks, step)
    todo = [i for i in range(len(tasks)) if i not in reused]
    target = model_fn(model, params, buffers)
    both = config.query_attack == "meta"
    inputs = {i: torch.cat([chunks[i][0], chunks[i][2]]) if both else chunks[i][0] for i in todo}
    labels = {i: torch.cat([chunks[i][1], chunks[i][3]]) if both else chunks[i][1] for i in todo}
    with attack_precision(config, x.device):
        if config.batched:
            adv = _batched_attacks(tasks, todo, target, inputs, labels)
        else:
            adv = {i: tasks[i](_target(options, model, params, buffers, tasks[i]) or target, inputs[i], labels[i])
                   for i in todo}  # fmt: skip
    n = config.support_size
    sets = [
        reused.get(i) or TaskSets(adv[i][:n], ys, adv[i][n:] if both else None, xq, yq, xs)
        for i, (xs, ys, xq, yq) in enumerate(chunks)
    ]
    for option in options:
        option.crafted(tasks, step, {i: sets[i] for i in todo})
    return sets


def _target(options: Sequence[MetaOption], model: nn.Module, params: Params, buffers: Params, task: AttackTask):
    for option in options:
        target = option.attack_target(model, params, buffers, task)
        if target is not None:
            return target
    return None


def _batched_attacks(tasks: Sequence[AttackTask], todo: list[int], target, inputs: dict[int, Tensor],
                     labels: dict[int, Tensor]) -> dict[int, Tensor]:  # fmt: skip
    grouped = [i for i in todo if tasks[i].runner is None]
    adv = {i: tasks[i](target, inputs[i], labels[i]) for i in todo if tasks[i].runner is not None}
    for group in group_by_batch_key([tasks[i].attack for i in grouped]):
        group = [grouped[j] for j in group]
        crafted = run_grouped([tasks[i].attack for i in group], target, [inputs[i] for i in group],
                              [labels[i] for i in group])  # fmt: skip
        adv.update(zip(group, crafted, strict=True))
    return adv
