"""One update per step, applied only if it is finite: checked at once, or checked once per logging window.

``apply_step`` reads the step's loss, gradient norm and logged values from the device (one host sync) and
applies the update only if the objective and the gradient norm are finite, else puts everything back.

``Window`` runs the steps of a logging window without waiting for the device: each update is applied as it
comes, and at the window's end the values of all its steps are read in one host sync. If every step was
finite the window stands; if one was not, the window is rolled back to its start (model, optimizer, the
method's state and the random states, copied in memory when it began) and replayed step by step with
``apply_step``. A step is a deterministic function of that state, so the replay recomputes the same steps,
skips the same bad one, and the run is bit for bit the one checked at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from .. import distributed
from .state import restore, snapshot

if TYPE_CHECKING:
    from .loop import StepFn, StepOutput, Trainable

__all__ = ["Window", "apply_step"]


def apply_step(trainable: Trainable, step: StepFn, x: Tensor, y: Tensor, index: int) -> dict[str, Any]:
    """Run ``step`` on one batch and apply its update if finite, else roll back; returns the step's record:
    ``loss``, the step's own entries, ``grad_norm`` and ``skipped``."""
    buffers = dict(trainable.model.named_buffers())
    before = {k: b.clone() for k, b in buffers.items()}  # put back if the step is skipped
    saved = snapshot(trainable.volatile)
    values, out = _backward(trainable, step, x, y, index)
    read = values.tolist()
    skipped = not _finite(read)
    if skipped:
        trainable.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(before[k])
        restore(trainable.volatile, saved)
    else:
        trainable.optimizer.step()
        distributed.average_buffers(buffers, before)  # BatchNorm statistics: the mean over ranks
    return _record(read, out, skipped)


@dataclass
class _Pending:
    index: int  # the step (0-based)
    batch: Tensor  # its examples' indices into the training set
    values: Tensor  # (3 + logged,): objective, gradient norm, loss, the logged tensors flattened
    out: StepOutput
    seconds: float  # the run's wall-clock when the host had issued the step


class Window:
    """The steps since the last host read: ``run`` applies each step unchecked, ``settle`` reads them all at once
    and, if one was not finite, replays the window checked. ``state``: every object a checkpoint saves (model,
    optimizer, the method's state); a window copies their states when it begins. ``clock``: the run's
    wall-clock (s), recorded with each step."""

    def __init__(self, trainable: Trainable, step: StepFn, state: Mapping[str, Any],
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.trainable, self.step, self.state, self.clock = trainable, step, state, clock
        self.saved = snapshot(state)
        self.rng = ckpt.capture_rng()
        self.pending: list[_Pending] = []

    def run(self, x: Tensor, y: Tensor, batch: Tensor, index: int) -> None:
        """Step ``index`` on the examples ``batch`` of ``(x, y)``; its update is applied without being checked."""
        buffers = dict(self.trainable.model.named_buffers()) if distributed.world_size() > 1 else {}
        before = {k: b.clone() for k, b in buffers.items()}
        values, out = _backward(self.trainable, self.step, x[batch], y[batch], index)
        self.trainable.optimizer.step()
        distributed.average_buffers(buffers, before)
        self.pending.append(_Pending(index, batch, values, out, self.clock()))

    def settle(self, x: Tensor, y: Tensor) -> Iterator[tuple[int, float, dict[str, Any]]]:
        """Each step's index, wall-clock and record, in order (one host sync). If a step was not finite, the
        state is put back to the window's start and each step is replayed checked as its record is asked for,
        so a caller that stops early (too many bad steps) leaves the model as the checked run would."""
        if not self.pending:
            return
        lengths = [p.values.numel() for p in self.pending]
        read = torch.cat([p.values for p in self.pending]).tolist()
        rows, start = [], 0
        for n in lengths:
            rows.append(read[start : start + n])
            start += n
        if all(_finite(r) for r in rows):
            for row, p in zip(rows, self.pending, strict=True):
                yield p.index, p.seconds, _record(row, p.out, False)
            return
        restore(self.state, self.saved)  # the window ends here: its copies are not needed again
        ckpt.restore_rng(self.rng)
        for p in self.pending:
            record = apply_step(self.trainable, self.step, x[p.batch], y[p.batch], p.index)
            yield p.index, self.clock(), record


def _backward(trainable: Trainable, step: StepFn, x: Tensor, y: Tensor, index: int) -> tuple[Tensor, StepOutput]:
    """Run ``step``, back-propagate its objective (summed over ranks) and gather on the device what the engine
    reads: objective, gradient norm, loss and the logged tensors, flattened into one vector."""
    out = step(x, y, index)
    optimizer, params, world = trainable.optimizer, list(trainable.params), distributed.world_size()
    optimizer.zero_grad(set_to_none=True)
    out.objective.backward()
    objective = distributed.all_reduce_gradients(params, out.objective) if world > 1 else out.objective
    grads = [p.grad for p in params if p.grad is not None]
    # one launch for every tensor's norm (per tensor on CPU, fused on CUDA), as clip_grad_norm_ does
    norms = torch._foreach_norm(grads) if grads else []
    grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=objective.device)
    logged = [t.detach().reshape(-1) for t in out.logged.values()]
    loss = objective.detach() if out.loss is None else out.loss.detach()
    return torch.cat([objective.detach().reshape(1), grad_norm.reshape(1), loss.reshape(1), *logged]), out


def _finite(values: list[float]) -> bool:
    """Whether a step's update may be applied: its objective and gradient norm are finite."""
    return math.isfinite(values[0]) and math.isfinite(values[1])


def _record(values: list[float], out: StepOutput, skipped: bool) -> dict[str, Any]:
    record: dict[str, Any] = {"loss": values[2], **out.record}
    offset = 3
    for name, t in out.logged.items():
        n = t.numel()
        record[name] = values[offset] if t.ndim == 0 else values[offset : offset + n]
        offset += n
    return {**record, "grad_norm": values[1], "skipped": skipped}
