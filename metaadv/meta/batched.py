"""T functional copies of a model run at once: the forward pass of the task-batched meta-step.

``task_forward`` vmaps the model over a task dimension: parameters the tasks share are passed once, adapted
ones as (T, *shape). Only the forward pass is vmapped; gradients are taken outside it with
``torch.autograd``, so every backward pass (the inner step's and the meta-backward through it) runs on the
batched kernels the forward recorded. That keeps native BatchNorm exact to second order: its vmapped
*backward* is the one with a wrong batching rule (DESIGN.md, "Pitfalls"; pytorch/functorch issue 534).
The task losses are independent, so the gradient of their sum with respect to (T, *shape) parameters
holds each task's own gradient. On CPU (``vectorize=False``) the same function runs the T forward passes one
after the other. Per-task buffers (FiLM codes) are picked with ``task_row`` / ``pick_buffers``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..batchnorm import BatchStatistics, BatchStats
from ..functional import Params, detach
from ..types import ModelFn

__all__ = [
    "pick_buffers",
    "pick_tasks",
    "read_only",
    "task_cross_entropy",
    "task_forward",
    "task_losses_of",
    "task_model_fn",
    "task_row",
    "vectorized",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def task_forward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    *,
    batched: Collection[str] | None = None,
    record: bool = False,
    second_order: bool = False,
    vectorize: bool = True,
) -> tuple[Tensor, BatchStats]:
    """Logits (T, B, K) of T copies of ``model`` on their own images ``x`` (T, B, C, H, W).

    ``batched`` names the parameters (or buffers) given per task, (T, *shape) (default: every parameter); the
    others are shared. Buffers are left unchanged (``read_only``). A training-mode BatchNorm normalizes each
    task with its own batch statistics and leaves the running statistics alone; with ``record`` it also
    returns each call's batch mean and unbiased variance, (T, C) each, by module prefix
    (``update_running_stats`` applies them). ``second_order``: the pass's backward will itself be
    differentiated (an inner step's ``create_graph``); BatchNorm then takes the backward that is cheap to
    differentiate (``batchnorm.BatchStatistics``). Each task draws its own random numbers (meta-dropout).

    ``vectorize``: one vmapped pass (GPU: the T copies' kernels launch once), or the T forward passes one after
    the other, stacked (CPU, where vmap's grouped convolutions and layout copies cost more than they save).
    The same values either way; gradients are taken outside both.
    """
    names = set(params) if batched is None else set(batched)
    tensors = {**params, **read_only(buffers)}
    per_task = {k: v for k, v in tensors.items() if k in names}
    shared = {k: v for k, v in tensors.items() if k not in names}

    def one(mine: Params, xb: Tensor) -> tuple[Tensor, BatchStats]:
        # the backward written in primitives is needed under vmap only (native BatchNorm's vmapped backward)
        with BatchStatistics(buffers if record else None, second_order=second_order and vectorize) as bn:
            return functional_call(model, {**shared, **mine}, (xb,)), bn.batch_stats

    if vectorize:
        return vmap(one, randomness="different")(per_task, x)
    rows = {k: v.unbind(0) for k, v in per_task.items()}  # one backward node per tensor (a select's fills (T, ...))
    outs = [one({k: r[t] for k, r in rows.items()}, xt) for t, xt in enumerate(x.unbind(0))]
    return torch.stack([logits for logits, _ in outs]), _stacked_stats([stats for _, stats in outs])


def _stacked_stats(per_task: list[BatchStats]) -> BatchStats:
    """The tasks' batch statistics as a vmapped pass returns them: per module and call, (T, C) tensors."""
    out: BatchStats = {}
    for prefix in per_task[0]:
        calls = zip(*(stats[prefix] for stats in per_task), strict=True)  # per call: each task's (mean, var)
        out[prefix] = [(torch.stack([m for m, _ in c]), torch.stack([v for _, v in c])) for c in calls]
    return out


def vectorized(vmap_tasks: bool | None, device: torch.device) -> bool:
    """``MetaConfig.vmap_tasks`` on ``device``: None vectorizes the task-batched passes on CUDA only."""
    return device.type == "cuda" if vmap_tasks is None else vmap_tasks


def task_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-task mean cross-entropy (T,) of logits (T, B, K) and labels (T, B): one kernel each, unvmapped."""
    per_example = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return per_example.view(y.shape).mean(1)


def task_losses_of(loss_fn: LossFn, logits: Tensor, y: Tensor) -> Tensor:
    """``loss_fn`` per task (T,) on logits (T, B, K) and labels (T, B) (cross-entropy without vmap)."""
    return task_cross_entropy(logits, y) if loss_fn is F.cross_entropy else vmap(loss_fn)(logits, y)


def task_model_fn(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    n_tasks: int,
    *,
    batched: Collection[str] = (),
    vectorize: bool = True,
) -> ModelFn:
    """An attack's model for ``n_tasks`` tasks at once: images (n_tasks * B, C, H, W), task by task -> logits.

    ``batched`` names the tensors given per task ((n_tasks, *shape): an adapted copy per task); the others
    are shared. Detached parameters, buffers left unchanged (``read_only``): the attack builds no graph to the
    parameters and moves no statistics; a training-mode BatchNorm normalizes each task's examples with their
    own batch statistics, as an attack on that task alone would.
    """
    fixed = detach(params)

    def fn(x: Tensor) -> Tensor:
        logits, _ = task_forward(model, fixed, buffers, x.view(n_tasks, -1, *x.shape[1:]), batched=batched,
                                 vectorize=vectorize)  # fmt: skip
        return logits.flatten(0, 1)

    return fn


def pick_tasks(tensors: Mapping[str, Tensor], tasks: Sequence[int]) -> Params:
    """Rows ``tasks`` of each (T, ...) tensor: views for a run of consecutive tasks, else one copy each (no
    index tensor to send to the device)."""
    first = tasks[0]
    if list(tasks) == list(range(first, first + len(tasks))):
        return {k: v[first : first + len(tasks)] for k, v in tensors.items()}
    return {k: torch.stack([v[i] for i in tasks]) for k, v in tensors.items()}


def pick_buffers(buffers: Mapping[str, Any], per_task: Collection[str], tasks: Sequence[int]) -> Params:
    """``buffers`` with each per-task entry, (T, ...), cut to the rows ``tasks`` (``pick_tasks``)."""
    return {**buffers, **pick_tasks({k: buffers[k] for k in per_task}, tasks)}


def task_row(buffers: Mapping[str, Any], per_task: Collection[str], i: int) -> Params:
    """Task ``i``'s buffers: row ``i`` of each per-task entry (a (T, ...) tensor or a list of T tensors)."""
    return {k: v[i] if k in per_task else v for k, v in buffers.items()}


def read_only(buffers: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
    """``buffers`` for a forward pass under ``BatchStatistics`` that must not change them: BatchNorm's
    ``num_batches_tracked`` counters as None, so the module does not count the batch (its running statistics
    are left alone by ``BatchStatistics``). No copies."""
    return {k: None if k.endswith("num_batches_tracked") else v for k, v in buffers.items()}
