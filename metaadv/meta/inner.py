"""The inner loop: adapt a functional copy of a model with SGD steps on a support set.

One ``adapt`` serves meta-training (differentiable, second order by default) and few-shot evaluation;
``adapt_tasks`` runs the same update rule for a batch of tasks at once (vmapped forward passes, the
task-batched meta-step).
Options of the update rule (docs/meta_options.md): adapt only the head (ANIL), a proximal term pulling the
adapted copy towards the start (soft parameter sharing), and per-parameter step sizes (Meta-SGD).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batchnorm import update_running_stats
from ..config import INNER_PARAMS
from ..functional import Params, call, clone_buffers, state
from ..validation import check_positive
from .batched import task_forward, task_losses_of, task_row

__all__ = ["adapt", "adapt_tasks", "init_inner_lr", "inner_parameter_names"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Gradient = Callable[[Params], Params]  # adapted parameters -> gradient of the support loss there, by name
LearningRate = float | Mapping[str, Tensor]  # one step size, or one tensor per adapted parameter (Meta-SGD)


def inner_parameter_names(model: nn.Module, inner_params: str = "all") -> list[str]:
    """Names of the parameters the inner loop adapts: ``"all"`` of them, the ``"head"``, or the BatchNorm
    layers' affine parameters (``"bn"``).

    The head (ANIL, Raghu et al. 2020) is the last module in ``model.named_modules()`` order (registration
    order) that holds parameters of its own: SmallCNN's final ``head.3`` Linear, PreActResNet18's ``linear``.
    A model that registers its classifier before other layers needs ``"all"`` or another layout. ``"bn"``
    adapts the scale and shift of every ``nn.BatchNorm*d`` and nothing else: with the support set's batch
    statistics in a training-mode inner loop, the adaptation test-time BN statistics make, plus a learned
    affine step (ARM-BN, Zhang et al. 2021; TaskNorm, Bronskill et al. 2020).
    """
    if inner_params not in INNER_PARAMS:
        raise ValueError(f"inner_params must be one of {INNER_PARAMS}, got {inner_params!r}")
    names = [k for k, _ in model.named_parameters()]
    if inner_params == "all":
        return names
    if inner_params == "bn":
        layers = [p for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        bn = [k for k in names if k.rpartition(".")[0] in layers]
        if not bn:
            raise ValueError(f"inner_params='bn' found no affine BatchNorm parameters in {type(model).__name__}")
        return bn
    owners = [prefix for prefix, m in model.named_modules() if list(m.parameters(recurse=False))]
    head = [k for k in names if owners and k.rpartition(".")[0] == owners[-1]]
    if not head:  # no parameters, or the last layer's are shared with an earlier one
        raise ValueError(f"inner_params='head' found no head parameters of their own in {type(model).__name__}")
    return head


def init_inner_lr(model: nn.Module, lr: float, inner_params: str = "all") -> Params:
    """Meta-SGD's learnable step sizes: a leaf tensor filled with ``lr`` shaped like each adapted parameter."""
    check_positive(lr, "lr")
    own = dict(model.named_parameters())
    return {k: torch.full_like(own[k], lr).requires_grad_() for k in inner_parameter_names(model, inner_params)}


def adapt(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]] | None = None,
    steps: int = 1,
    lr: LearningRate = 0.01,
    first_order: bool = False,
    loss_fn: LossFn = F.cross_entropy,
    inner_params: str = "all",
    proximal: float = 0.0,
) -> Params:
    """Take ``steps`` SGD steps ``theta <- theta - lr * grad L(f_theta(x), y)`` on a functional copy.

    Args:
        model: the network; its own parameters and buffers are never modified.
        x: support images (B, C, H, W) in [0, 1] (typically adversarial examples of one task).
        y: support labels (B,).
        params: starting parameters (default: the model's own). The result is differentiable with
            respect to them, so a query loss at the adapted point back-propagates to the meta-parameters.
        buffers: buffers for the forward passes (default: scratch copies of the model's, so BatchNorm
            running statistics of a training-mode model do not move). Pass per-task buffers to keep
            per-task statistics; they are updated in place when the model is in training mode. A sequence
            of ``steps`` buffer dicts gives each step its own: step k's forward pass (at theta^(k)) uses
            ``buffers[k]`` (per-step BatchNorm statistics, MAML++; see ``step_bn.py``).
        steps: number of inner SGD steps (>= 0).
        lr: inner learning rate (> 0), or a tensor per adapted parameter, shaped like it (Meta-SGD's
            learned step sizes, see ``init_inner_lr``; the result is differentiable w.r.t. them).
        first_order: if True, the inner gradients are detached (first-order MAML): the meta-gradient
            becomes the query gradient at the adapted point. If False (default), the inner gradients
            keep their graph (``create_graph=True``) and the meta-gradient is exact (second order).
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        inner_params: ``"all"`` adapts every parameter; ``"head"`` only the last layer's (ANIL, see
            ``inner_parameter_names``): the others stay at ``params`` and still receive meta-gradients.
        proximal: weight lambda >= 0 of a proximal term: each step descends
            ``L(f_theta'(x), y) + lambda * ||theta' - theta||^2`` with theta the starting parameters.

    Returns:
        The adapted parameters, a dict name -> tensor usable as
        ``torch.func.functional_call(model, {**params, **buffers}, (x,))``.

    The model's train/eval mode decides BatchNorm's behaviour, as in a normal forward pass.
    """
    theta, fast, own_buffers = _start(model, params, steps, lr, inner_params, proximal)
    per_step = iter(_step_buffers(clone_buffers(own_buffers) if buffers is None else buffers, steps))
    # Parameters that carry no graph (e.g. detached copies at evaluation time) become leaves we can
    # differentiate; parameters from the meta-model keep their graph.
    fast = {k: theta[k] if theta[k].requires_grad else theta[k].detach().requires_grad_() for k in fast}

    def gradient(fast: Params) -> Params:
        loss = loss_fn(call(model, {**theta, **fast}, next(per_step), x), y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        return dict(zip(fast, grads, strict=True))

    with torch.enable_grad():
        return {**theta, **_sgd_steps(fast, gradient, steps, lr, proximal)}


def adapt_tasks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]] | None = None,
    steps: int = 1,
    lr: LearningRate = 0.01,
    first_order: bool = False,
    loss_fn: LossFn = F.cross_entropy,
    inner_params: str = "all",
    proximal: float = 0.0,
    batched_buffers: Collection[str] = (),
    vectorize: bool = True,
) -> Params:
    """``adapt`` for T tasks at once: support images ``x`` (T, S, C, H, W), labels ``y`` (T, S).

    The same update rule as ``adapt``: each step's forward pass runs the T copies at once
    (``batched.task_forward``) and one ``torch.autograd.grad`` of the summed task losses gives every task's
    gradient. Returns adapted parameters name -> (T, *shape), differentiable w.r.t. ``params`` as
    ``adapt``'s are (parameters the inner loop does not adapt are expanded views of ``params``). BatchNorm
    normalizes each task with its own batch statistics. ``buffers`` as in ``adapt`` (a sequence: one dict per
    step): given ones are updated in place when the model is in training mode, as the tasks' looped passes
    would update them one task after the other (``update_running_stats``); by default the model's own are
    read and left unchanged. ``batched_buffers``: the buffers given per task, (T, *shape) (FiLM task codes).
    ``vectorize``: the forward passes vmapped or one task after the other (``batched.task_forward``).
    """
    theta, fast, own_buffers = _start(model, params, steps, lr, inner_params, proximal)
    if not vectorize:
        return _adapt_each(
            model,
            x,
            y,
            params=theta,
            buffers=buffers,
            steps=steps,
            lr=lr,
            first_order=first_order,
            loss_fn=loss_fn,
            inner_params=inner_params,
            proximal=proximal,
            batched=batched_buffers,
        )
    per_step = iter(_step_buffers(own_buffers if buffers is None else buffers, steps))
    update = buffers is not None and model.training
    n = len(x)
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in fast.items()}
    # Vectorized (GPU): the adapted parameters as one (T, P) tensor, so that each update is one kernel whatever
    # their number; the model reads views of it, and Meta-SGD's step sizes are flattened alike. Else one
    # (T, *shape) tensor per name (on CPU the flat copies cost more than the kernels they save).
    flat = _Flat(leaves, n) if vectorize else None
    start = flat.start() if flat else {k: v.expand(n, *v.shape) for k, v in leaves.items()}
    step_lr = flat.lr(lr) if flat and isinstance(lr, Mapping) else lr

    def gradient(fast: Params) -> Params:
        views, step_buffers = flat.views(fast) if flat else fast, next(per_step)
        names = {*views, *batched_buffers}
        logits, stats = task_forward(model, {**theta, **views}, step_buffers, x, batched=names, record=update,
                                     second_order=not first_order, vectorize=vectorize)  # fmt: skip
        if update:
            update_running_stats(model, step_buffers, stats)
        loss = task_losses_of(loss_fn, logits, y).sum()  # the tasks' losses are independent
        grads = dict(zip(views, torch.autograd.grad(loss, list(views.values()), create_graph=not first_order),
                         strict=True))  # fmt: skip
        return flat.join(grads) if flat else grads

    with torch.enable_grad():
        adapted = _sgd_steps(start, gradient, steps, step_lr, proximal)
    adapted = flat.views(adapted) if flat else adapted
    return {k: adapted[k] if k in adapted else v.expand(n, *v.shape) for k, v in theta.items()}


def _adapt_each(model: nn.Module, x: Tensor, y: Tensor, *, params: Params, buffers: Any, batched: Collection[str],
                **settings: Any) -> Params:  # fmt: skip
    """``adapt_tasks`` one task after the other: ``adapt`` on each task's rows, stacked (CPU: a task's gradients
    accumulate into the meta-parameters directly, with no (T, *shape) gradient to assemble)."""
    out = []
    for t in range(len(x)):
        if buffers is None or isinstance(buffers, Mapping):
            mine = None if buffers is None else task_row(buffers, batched, t)
        else:
            mine = [task_row(b, batched, t) for b in buffers]  # one dict per inner step
        out.append(adapt(model, x[t], y[t], params=params, buffers=mine, **settings))
    return {k: torch.stack([o[k] for o in out]) for k in params}


class _Flat:
    """The T copies' adapted parameters as one ``{"flat": (T, P)}`` dict, and the views the model reads."""

    def __init__(self, leaves: Params, n: int) -> None:
        self.leaves, self.n = leaves, n

    def start(self) -> Params:
        return {"flat": torch.cat([v.reshape(-1) for v in self.leaves.values()]).expand(self.n, -1)}

    def lr(self, lr: Mapping[str, Tensor]) -> Params:
        return {"flat": torch.cat([lr[k].reshape(-1) for k in self.leaves])}

    def views(self, fast: Params) -> Params:
        parts = fast["flat"].split([v.numel() for v in self.leaves.values()], dim=1)
        return {k: w.view(self.n, *v.shape) for (k, v), w in zip(self.leaves.items(), parts, strict=True)}

    def join(self, grads: Params) -> Params:
        return {"flat": torch.cat([grads[k].reshape(self.n, -1) for k in self.leaves], 1)}


def _start(
    model: nn.Module, params: Mapping[str, Tensor] | None, steps: int, lr: LearningRate, inner_params: str,
    proximal: float,
) -> tuple[Params, Params, Params]:  # fmt: skip
    """Checked arguments: the starting parameters (default: the model's), those the inner loop adapts, and
    the model's own buffers."""
    check_positive(steps, "steps", allow_zero=True, integer=True)
    check_positive(proximal, "proximal", allow_zero=True)
    own_params, own_buffers = state(model)
    theta = dict(own_params if params is None else params)
    if set(theta) != set(own_params):
        missing, extra = set(own_params) - set(theta), set(theta) - set(own_params)
        raise ValueError(f"params must name every model parameter; missing {sorted(missing)}, extra {sorted(extra)}")
    fast = {k: theta[k] for k in inner_parameter_names(model, inner_params)}
    if isinstance(lr, Mapping):
        if set(lr) != set(fast):
            raise ValueError(f"lr must hold one tensor per adapted parameter {sorted(fast)}, got {sorted(lr)}")
        for k, v in lr.items():
            if not isinstance(v, Tensor) or v.shape != fast[k].shape:
                raise ValueError(f"lr[{k!r}] must be a tensor of shape {tuple(fast[k].shape)}, got {v!r}")
    else:
        check_positive(lr, "lr")
    return theta, fast, own_buffers


def _step_buffers(buffers: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]], steps: int) -> list[Mapping]:
    """``adapt``'s buffers, one dict per inner step: a mapping serves every step, a sequence gives one each."""
    if isinstance(buffers, Mapping):
        return [buffers] * steps
    if not isinstance(buffers, Sequence) or not all(isinstance(b, Mapping) for b in buffers):
        raise TypeError(f"buffers must be a mapping name -> tensor or a sequence of them, got {type(buffers).__name__}")
    if len(buffers) != steps:
        raise ValueError(f"buffers holds {len(buffers)} dicts, one per inner step is needed: steps={steps}")
    return list(buffers)


def _sgd_steps(theta: Params, gradient: Gradient, steps: int, lr: LearningRate, proximal: float) -> Params:
    """The inner-loop update rule on the adapted parameters ``theta``: ``steps`` times
    ``theta' <- theta' - lr * (gradient(theta') + 2 * proximal * (theta' - theta))`` (``lr`` a number or
    a tensor per name), starting from ``theta' = theta``; theta stays in the graph."""
    fast = theta
    for _ in range(steps):
        grads = gradient(fast)
        if proximal:
            grads = {k: g + 2 * proximal * (fast[k] - theta[k]) for k, g in grads.items()}
        fast = {k: p - (lr[k] if isinstance(lr, Mapping) else lr) * grads[k] for k, p in fast.items()}
    return fast
