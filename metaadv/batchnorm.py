"""BatchNorm from primitives for task-batched (``vmap``) passes, and the running-statistics updates it defers.

Second-order gradients through native BatchNorm under ``torch.func.vmap`` are wrong (about 1e-4 relative
in float64: the batching rule of its backward, pytorch/functorch issue 534), and a training-mode native
BatchNorm cannot update shared running statistics from a batch of tasks. Inside
``with BatchNormFromPrimitives():`` every ``F.batch_norm`` call (so every ``nn.BatchNorm*d``) is computed
from mean/var/rsqrt and leaves the running statistics alone; the batch statistics it records are applied
afterwards by :func:`update_running_stats`, task by task as the looped forward passes would have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["BatchNormFromPrimitives", "BatchStats", "update_running_stats"]

BatchStats = dict[str, list[tuple[Tensor, Tensor]]]  # module prefix -> per call: (mean (C,), unbiased var (C,))


class BatchNormFromPrimitives(TorchFunctionMode):
    """Compute ``F.batch_norm`` from primitives inside the block; never update running statistics.

    Args:
        buffers: the buffers the forward passes use (as given to ``functional_call``). With them, each
            training-mode call that tracks running statistics records its batch mean and unbiased variance
            (C,) in ``batch_stats`` under its module's prefix (``"features.1."``), in call order: return
            ``batch_stats`` from a vmapped function to get them per task, (T, C) each. Without them nothing
            is recorded.

    Eval-mode calls normalize with the running statistics, also from primitives. The module's own
    ``num_batches_tracked`` increment still happens (on whatever buffers the forward pass was given).
    """

    def __init__(self, buffers: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        self.record = buffers is not None
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
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast (C,) over (N, C, *)
        if training or running_mean is None or running_var is None:
            n = x.numel() // x.shape[1]  # values per channel
            if n <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
            dims = [0, *range(2, x.dim())]
            mean, var = x.mean(dims), x.var(dims, correction=0)
            if self.record and running_mean is not None:
                if id(running_mean) not in self._prefix:
                    raise ValueError("a BatchNorm call tracks running statistics that are not among the given buffers")
                stats = (mean.detach(), var.detach() * (n / (n - 1)))
                self.batch_stats.setdefault(self._prefix[id(running_mean)], []).append(stats)
        else:
            mean, var = running_mean, running_var
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        return out


@torch.no_grad()
def update_running_stats(model: nn.Module, buffers: Mapping[str, Tensor], batch_stats: BatchStats) -> None:
    """Update ``buffers`` in place as native BatchNorm would have, one task after the other.

    ``batch_stats`` maps a module prefix to its calls' (mean (T, C), unbiased var (T, C)) from a vmapped
    pass over T tasks. The sequence is task-major (task 1's calls, then task 2's, ...), applied in closed
    form: with momentum m over N updates, ``r <- (1-m)^N r + sum_i m (1-m)^(N-1-i) s_i``; with momentum
    None (cumulative average), ``r <- (n0 r + sum_i s_i) / (n0 + N)``; ``num_batches_tracked += N``.
    """
    for prefix, calls in batch_stats.items():
        module = model.get_submodule(prefix.rstrip("."))
        means = torch.stack([m for m, _ in calls], dim=1).flatten(0, 1)  # (N, C), task-major
        variances = torch.stack([v for _, v in calls], dim=1).flatten(0, 1)
        n = means.shape[0]
        running_mean, running_var = buffers[prefix + "running_mean"], buffers[prefix + "running_var"]
        tracked = buffers.get(prefix + "num_batches_tracked")
        if module.momentum is None:
            seen = tracked.to(running_mean.dtype)
            for running, seq in ((running_mean, means), (running_var, variances)):
                running.mul_(seen).add_(seq.sum(0)).div_(seen + n)
        else:
            m = module.momentum
            ages = torch.arange(n - 1, -1, -1, dtype=running_mean.dtype, device=running_mean.device)
            weights = (m * (1 - m) ** ages).unsqueeze(1)  # (N, 1): the weight of each update in the result
            for running, seq in ((running_mean, means), (running_var, variances)):
                running.mul_(math.pow(1 - m, n)).add_((weights * seq).sum(0))
        if tracked is not None:
            tracked.add_(n)
