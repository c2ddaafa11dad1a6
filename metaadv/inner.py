"""The inner loop: adapt a functional copy of a model with SGD steps on a support set.

One ``adapt`` serves meta-training (differentiable, second order by default) and few-shot evaluation;
``adapt_tasks`` runs the same update rule for a batch of tasks at once (``vmap``, task-batched meta-step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from .batchnorm import BatchNormFromPrimitives
from .functional import Params, call, clone_buffers, detach, state
from .validation import check_positive

__all__ = ["adapt", "adapt_tasks"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Gradient = Callable[[Params], Params]  # theta -> gradient of the support loss at theta, by name


def adapt(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    steps: int = 1,
    lr: float = 0.01,
    first_order: bool = False,
    loss_fn: LossFn = F.cross_entropy,
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
            per-task statistics; they are updated in place when the model is in training mode.
        steps: number of inner SGD steps (>= 0).
        lr: inner learning rate (> 0).
        first_order: if True, the inner gradients are detached (first-order MAML): the meta-gradient
            becomes the query gradient at the adapted point. If False (default), the inner gradients
            keep their graph (``create_graph=True``) and the meta-gradient is exact (second order).
        loss_fn: ``loss_fn(logits, y) -> scalar``.

    Returns:
        The adapted parameters, a dict name -> tensor usable as
        ``torch.func.functional_call(model, {**params, **buffers}, (x,))``.

    The model's train/eval mode decides BatchNorm's behaviour, as in a normal forward pass.
    """
    theta, own_buffers = _start(model, params, steps, lr)
    scratch = clone_buffers(own_buffers) if buffers is None else buffers
    # Parameters that carry no graph (e.g. detached copies at evaluation time) become leaves we can
    # differentiate; parameters from the meta-model keep their graph.
    theta = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in theta.items()}

    def gradient(theta: Params) -> Params:
        loss = loss_fn(call(model, theta, scratch, x), y)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=not first_order)
        return dict(zip(theta, grads, strict=True))

    with torch.enable_grad():
        return _sgd_steps(theta, gradient, steps, lr)


def adapt_tasks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    steps: int = 1,
    lr: float = 0.01,
    first_order: bool = False,
    loss_fn: LossFn = F.cross_entropy,
) -> Params:
    """``adapt`` for T tasks at once: support images ``x`` (T, S, C, H, W), labels ``y`` (T, S).

    The same update rule as ``adapt``, vmapped over the task dimension, with the gradient from
    ``torch.func.grad`` (``torch.autograd.grad`` does not run under vmap; first order takes it at a
    detached copy). Returns adapted parameters name -> (T, *shape), differentiable w.r.t. ``params``
    as ``adapt``'s are. BatchNorm is computed from primitives (native BatchNorm's second-order gradients
    are wrong under vmap) and never moves running statistics: ``buffers`` (default: the model's) are
    read, not updated. Unlike ``adapt`` it cannot run inside ``torch.autograd.graph.saved_tensors_hooks``
    (torch.func's limitation).
    """
    theta, own_buffers = _start(model, params, steps, lr)
    scratch = clone_buffers(own_buffers if buffers is None else buffers)  # BatchNorm's batch counts land here

    def one_task(xs: Tensor, ys: Tensor) -> Params:
        def support_loss(theta: Params, scratch: Params) -> Tensor:  # buffers an argument: torch.func lets it mutate
            return loss_fn(call(model, theta, scratch, xs), ys)

        def gradient(theta: Params) -> Params:
            return grad(support_loss)(detach(theta) if first_order else theta, scratch)

        return _sgd_steps(theta, gradient, steps, lr)

    with BatchNormFromPrimitives(), torch.enable_grad():
        return vmap(one_task)(x, y)


def _start(model: nn.Module, params: Mapping[str, Tensor] | None, steps: int, lr: float) -> tuple[Params, Params]:
    """Checked arguments: the starting parameters (default: the model's) and the model's own buffers."""
    check_positive(steps, "steps", allow_zero=True, integer=True)
    check_positive(lr, "lr")
    own_params, own_buffers = state(model)
    theta = dict(own_params if params is None else params)
    if set(theta) != set(own_params):
        missing, extra = set(own_params) - set(theta), set(theta) - set(own_params)
        raise ValueError(f"params must name every model parameter; missing {sorted(missing)}, extra {sorted(extra)}")
    return theta, own_buffers


def _sgd_steps(theta: Params, gradient: Gradient, steps: int, lr: float) -> Params:
    """The inner-loop update rule: ``steps`` times ``theta <- theta - lr * gradient(theta)``."""
    for _ in range(steps):
        grads = gradient(theta)
        theta = {k: p - lr * grads[k] for k, p in theta.items()}
    return theta
