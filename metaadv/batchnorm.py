"""BatchNorm in task-batched (``vmap``) forward passes, and the running-statistics updates it defers.

A training-mode native BatchNorm cannot update shared running statistics from a batch of tasks (each task
has its own batch statistics). Inside ``with BatchStatistics():`` every training-mode ``F.batch_norm`` call
(so every ``nn.BatchNorm*d``) normalizes with its batch statistics only and leaves the running statistics
alone; the batch statistics it records are applied afterwards by :func:`update_running_stats`, task by task
as the looped forward passes would have. Only forward passes run under ``vmap`` (``meta/batched.py``):
native BatchNorm's second-order gradients are wrong when its backward runs under ``vmap`` (DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .views import to_device

__all__ = ["BatchStatistics", "BatchStats", "update_running_stats"]

BatchStats = dict[str, list[tuple[Tensor, Tensor]]]  # module prefix -> per call: (mean (C,), unbiased var (C,))


class BatchStatistics(TorchFunctionMode):
    """Training-mode ``F.batch_norm`` with batch statistics only inside the block (running statistics neither
    read nor updated); eval-mode calls are unchanged.

    Args:
        buffers: the buffers the forward passes use (as given to ``functional_call``). With them, each
            training-mode call that tracks running statistics records its batch mean and unbiased variance
            (C,), detached, in ``batch_stats`` under its module's prefix (``"features.1."``), in call order:
            return ``batch_stats`` from a vmapped function to get them per task, (T, C) each. Without them
            nothing is recorded.

    The module's own ``num_batches_tracked`` increment still happens (on whatever buffers the forward pass
    was given).
    """

    def __init__(self, buffers: Mapping[str, Tensor] | None = None, *, second_order: bool = False) -> None:
        super().__init__()
        self.record, self.second_order = buffers is not None, second_order
        suffix = "running_mean"
        self._prefix = {id(v): k[: -len(suffix)] for k, v in (buffers or {}).items() if k.endswith(suffix)}
        self.batch_stats: BatchStats = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.batch_norm:
            return self._batch_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))

    def _batch_norm(
        self,
        x: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        training: bool = False,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
    ) -> Tensor:
        if not training and running_mean is not None and running_var is not None:
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
        if self.record and running_mean is not None:
            if id(running_mean) not in self._prefix:
                raise ValueError("a BatchNorm call tracks running statistics that are not among the given buffers")
            with torch.no_grad():
                var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=1)
            self.batch_stats.setdefault(self._prefix[id(running_mean)], []).append((mean, var))
        if self.second_order and weight is not None and bias is not None:
            return _BatchNormTraining.apply(x, weight, bias, eps)
        return F.batch_norm(x, None, None, weight, bias, True, momentum, eps)


class _BatchNormTraining(torch.autograd.Function):
    """Training-mode BatchNorm (batch statistics): the native kernel forward, and a backward written in
    differentiable primitives, so that its own backward (second-order gradients: the meta-gradient through an
    inner step) is autograd's through about 15 operators rather than native BatchNorm's double backward
    (about 80 kernels per layer). Affine layers only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, _, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, weight = ctx.saved_tensors
        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        invstd = (var + ctx.eps).rsqrt()
        xhat = (x - mean) * invstd
        grad_bias, grad_weight = g.sum(dims), (g * xhat).sum(dims)
        n = x.numel() // x.shape[1]
        centred = g - (grad_bias.view(shape) + xhat * grad_weight.view(shape)) / n
        return (weight.view(shape) * invstd) * centred, grad_weight, grad_bias, None


@torch.no_grad()
def update_running_stats(model: nn.Module, buffers: Mapping[str, Tensor], batch_stats: BatchStats) -> None:
    """Update ``buffers`` in place as native BatchNorm would have, one task after the other.

    ``batch_stats`` maps a module prefix to its calls' (mean (T, C), unbiased var (T, C)) from a vmapped
    pass over T tasks. The sequence is task-major (task 1's calls, then task 2's, ...), applied in closed
    form: with momentum m over N updates, ``r <- (1-m)^N r + sum_i m (1-m)^(N-1-i) s_i``; with momentum
    None (cumulative average), ``r <- (n0 r + sum_i s_i) / (n0 + N)``; ``num_batches_tracked += N``.
    """
    weights: dict[tuple[float, int], Tensor] = {}  # (momentum, N) -> the updates' weights, on the device
    for prefix, calls in batch_stats.items():
        module = model.get_submodule(prefix.rstrip("."))
        means, variances = _sequence(calls, 0), _sequence(calls, 1)  # (N, C) each
        n = means.shape[0]
        running_mean, running_var = buffers[prefix + "running_mean"], buffers[prefix + "running_var"]
        tracked = buffers.get(prefix + "num_batches_tracked")
        if module.momentum is None:
            seen = tracked.to(running_mean.dtype)
            for running, seq in ((running_mean, means), (running_var, variances)):
                running.mul_(seen).add_(seq.sum(0)).div_(seen + n)
        else:
            m = module.momentum
            if (m, n) not in weights:  # m (1-m)^(N-1-i) for update i, computed on the host
                w = torch.tensor([m * (1 - m) ** (n - 1 - i) for i in range(n)], dtype=running_mean.dtype)
                weights[m, n] = to_device(w, running_mean.device)
            for running, seq in ((running_mean, means), (running_var, variances)):
                running.addmv_(seq.t(), weights[m, n], beta=math.pow(1 - m, n))
        if tracked is not None:
            tracked.add_(n)


def _sequence(calls: list[tuple[Tensor, Tensor]], j: int) -> Tensor:
    """Item ``j`` (0: mean, 1: variance) of a module's calls, (T, C) each, as one task-major (N, C) sequence."""
    return calls[0][j] if len(calls) == 1 else torch.stack([c[j] for c in calls], 1).flatten(0, 1)
