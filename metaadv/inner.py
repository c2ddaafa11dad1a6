"""The inner loop: adapt a functional copy of a model with SGD steps on a support set.

One ``adapt`` serves meta-training (differentiable, second order by default) and few-shot evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import Params, call, clone_buffers, state
from .validation import check_positive

__all__ = ["adapt"]

LossFn = Callable[[Tensor, Tensor], Tensor]


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
    check_positive(steps, "steps", allow_zero=True, integer=True)
    check_positive(lr, "lr")
    own_params, own_buffers = state(model)
    theta = dict(own_params if params is None else params)
    if set(theta) != set(own_params):
        missing, extra = set(own_params) - set(theta), set(theta) - set(own_params)
        raise ValueError(f"params must name every model parameter; missing {sorted(missing)}, extra {sorted(extra)}")
    scratch = clone_buffers(own_buffers) if buffers is None else buffers
    # Parameters that carry no graph (e.g. detached copies at evaluation time) become leaves we can
    # differentiate; parameters from the meta-model keep their graph.
    theta = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in theta.items()}
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_fn(call(model, theta, scratch, x), y)
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=not first_order)
            theta = {k: p - lr * g for (k, p), g in zip(theta.items(), grads, strict=True)}
    return theta
