"""The attack stage of a meta-step: each task's adversarial support (and query) set, crafted against the
meta-parameters, looped over tasks or one attack call per attack family (``MetaConfig.batched``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..attacks.compiled import compiled_attacks
from ..attacks.spec import group_by_batch_key, run_grouped
from ..config import MetaConfig
from ..functional import Params, model_fn
from ..tasks import AttackTask, split_support_query
from ..views import cat_rows
from .batched import pick_buffers, task_model_fn, vectorized
from .options.base import MetaOption, TaskBuffers
from .sets import TaskSets

__all__ = ["attack_precision", "craft_task_sets"]


@contextlib.contextmanager
def attack_precision(config: MetaConfig, device: torch.device) -> Iterator[None]:
    """The context the attacks run in: bf16 autocast on ``device`` if ``config.autocast_attacks``, else a no-op;
    their per-step gradient compiled as ``config.compile_attacks`` says (``attacks/compiled.py``).

    Under autocast the model's convolutions and matrix products run in bfloat16; the perturbation, its
    projection and the returned examples stay float32, so every bound holds exactly as without it.
    """
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast_attacks)
    with autocast, compiled_attacks(config.compile_attacks):
        yield


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
    Each task's examples are normalized with their own statistics by a training-mode BatchNorm in both modes;
    random starts are drawn for a group at once, so batched and looped crafting agree exactly for
    deterministic attacks. No attack call reads values back from the device (the training data is checked
    once, ``engine.setup.training_tensors``).

    ``options`` act here through their ``reused`` / ``crafted`` hooks (sets taken instead of attacking: the
    reuse pool) and ``attack_buffers`` (the buffers the attacks target: FiLM type codes); ``step`` is the
    0-based meta-step index they may read.
    """
    chunks = split_support_query(x, y, len(tasks), config.support_size, config.query_size)
    reused: dict[int, TaskSets] = {}
    for option in options:
        reused |= option.reused(tasks, step)
    todo = [i for i in range(len(tasks)) if i not in reused]
    both = config.query_attack == "meta"
    inputs = {i: cat_rows([chunks[i][0], chunks[i][2]]) if both else chunks[i][0] for i in todo}
    labels = {i: cat_rows([chunks[i][1], chunks[i][3]]) if both else chunks[i][1] for i in todo}
    target = _attack_buffers(options, model, params, buffers, tasks)
    with attack_precision(config, x.device):
        if config.batched:
            vectorize = vectorized(config.vmap_tasks, x.device)
            adv = _batched_attacks(model, params, target, tasks, todo, inputs, labels, vectorize)
        else:
            meta = model_fn(model, params, buffers) if not target.per_task else None
            adv = {i: tasks[i](meta or model_fn(model, params, target.of(i)), inputs[i], labels[i], check=False)
                   for i in todo}  # fmt: skip
    n = config.support_size
    sets = [
        reused.get(i) or TaskSets(adv[i][:n], ys, adv[i][n:] if both else None, xq, yq, xs)
        for i, (xs, ys, xq, yq) in enumerate(chunks)
    ]
    for option in options:
        option.crafted(tasks, step, {i: sets[i] for i in todo})
    return sets


def _attack_buffers(options: Sequence[MetaOption], model: nn.Module, params: Params, buffers: Params,
                    tasks: Sequence[AttackTask]) -> TaskBuffers:  # fmt: skip
    """The buffers the attacks target: the first option's that has some (FiLM type codes), else the model's."""
    for option in options:
        found = option.attack_buffers(model, params, buffers, tasks)
        if found is not None:
            return found
    return TaskBuffers(buffers, frozenset())


def _batched_attacks(
    model: nn.Module,
    params: Params,
    target: TaskBuffers,
    tasks: Sequence[AttackTask],
    todo: list[int],
    inputs: dict[int, Tensor],
    labels: dict[int, Tensor],
    vectorize: bool,
) -> dict[int, Tensor]:
    """One attack call per attack family, against the meta-parameters (at each task's own buffers where an option
    gives some per task), each task's examples normalized by a training-mode BatchNorm with their own statistics
    as in the looped step (``task_model_fn``)."""
    grouped = [i for i in todo if tasks[i].runner is None]
    adv = {i: tasks[i](model_fn(model, params, target.of(i)), inputs[i], labels[i])
           for i in todo if tasks[i].runner is not None}  # fmt: skip
    stacked = target.stacked()
    for group in group_by_batch_key([tasks[i].attack for i in grouped]):
        group = [grouped[j] for j in group]
        buffers = pick_buffers(stacked, target.per_task, group)
        fn = task_model_fn(model, params, buffers, len(group), batched=target.per_task, vectorize=vectorize)
        crafted = run_grouped([tasks[i].attack for i in group], fn, [inputs[i] for i in group],
                              [labels[i] for i in group])  # fmt: skip
        adv.update(zip(group, crafted, strict=True))
    return adv
