"""Task parallelism under ``torchrun``: process-group set-up, rank helpers and the collectives of a meta-step.

Every rank samples the same meta-batch of tasks and the same clean batch, takes its contiguous share of
tasks (``shard``), crafts and adapts them, and the meta-gradients are summed across ranks
(``all_reduce_gradients``), so every rank takes the same optimizer step. Without ``torchrun`` (no
``WORLD_SIZE`` > 1 in the environment and no process group) every helper is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_gradients",
    "average_buffers",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "gather_objects",
    "gather_tasks",
    "is_main",
    "main_first",
    "max_over_ranks",
    "rank",
    "setup",
    "shard",
    "shutdown",
    "world_size",
]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, else ``RANK`` (set by torchrun), else 0."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes: from the process group, else ``WORLD_SIZE`` (set by torchrun), else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """True on rank 0, the process that logs, shows progress and writes checkpoints and outputs."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the torchrun process group if the environment asks for one; return this rank's device.

    With ``WORLD_SIZE`` > 1 and no process group yet, initializes one from the ``env://`` variables
    torchrun sets (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``): gloo on CPU, NCCL on
    CUDA. A CUDA device without an index becomes ``cuda:LOCAL_RANK`` (one GPU per process). Idempotent.
    """
    if world_size() == 1:
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world_size()} but this torch build has no torch.distributed")
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    """Leave the process group (if one was joined); call once at the end of a torchrun program."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n_tasks: int, rank: int, world: int) -> slice:
    """The tasks of a meta-batch of ``n_tasks`` that ``rank`` of ``world`` processes handles (a contiguous block)."""
    if n_tasks % world != 0:
        raise ValueError(
            f"MetaConfig.tasks_per_batch={n_tasks} is not divisible by the world size {world} (the number of "
            f"torchrun processes): use a multiple of {world} tasks per meta-batch or another --nproc_per_node"
        )
    per_rank = n_tasks // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def all_reduce_gradients(params: Iterable[Tensor], loss: Tensor) -> Tensor:
    """Sum the ``.grad`` of ``params`` and the scalar ``loss`` over ranks, in one collective; returns the summed loss.

    Each rank back-propagates its share of the meta-loss (its tasks' loss sum / total tasks), so the
    sums are the gradient and loss of the whole meta-batch. A parameter without a gradient on this rank
    counts as zeros (parameters with ``requires_grad=False`` are left alone). One process: unchanged.
    """
    if not _active():
        return loss
    trainable = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    dtype = loss.dtype
    for g in grads:
        dtype = torch.promote_types(dtype, g.dtype)
    flat = torch.cat([loss.detach().reshape(1).to(dtype), *(g.reshape(-1).to(dtype) for g in grads)])
    dist.all_reduce(flat)
    offset = 1
    for p, g in zip(trainable, grads, strict=True):
        summed = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()
        if p.grad is None:
            p.grad = summed.to(p.dtype).clone()
        else:
            p.grad.copy_(summed)
    return flat[0].to(loss.dtype)


def gather_tasks(stats: Tensor) -> Tensor:
    """Per-task statistics of every rank in meta-batch order: ``(K, n_local)`` -> ``(K, n_local * world)``."""
    if not _active():
        return stats
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, stats.contiguous())
    return torch.cat(parts, dim=1)


@torch.no_grad()
def average_buffers(buffers: Mapping[str, Tensor], before: Mapping[str, Tensor]) -> None:
    """Combine the buffers each rank updated during a step: floating ones (BatchNorm running mean and
    variance) are averaged over ranks; integer ones (``num_batches_tracked``) become ``before`` plus the
    sum of every rank's increments, so they count what one process would have counted."""
    if not _active():
        return
    world = dist.get_world_size()
    floats = [k for k, b in buffers.items() if b.is_floating_point()]
    counts = [k for k, b in buffers.items() if not b.is_floating_point()]
    if floats:
        flat = torch.cat([buffers[k].reshape(-1).to(torch.float64) for k in floats])
        dist.all_reduce(flat)
        flat /= world
        _unflatten_into(flat, [buffers[k] for k in floats])
    if counts:
        flat = torch.cat([(buffers[k] - before[k]).reshape(-1).to(torch.int64) for k in counts])
        dist.all_reduce(flat)
        for k, delta in zip(counts, _split_like(flat, [buffers[k] for k in counts]), strict=True):
            buffers[k].copy_(before[k] + delta)


def _split_like(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


def _unflatten_into(flat: Tensor, targets: list[Tensor]) -> None:
    for t, part in zip(targets, _split_like(flat, targets), strict=True):
        t.copy_(part)


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (parameters, buffers) on every rank with rank ``src``'s values, in place."""
    if _active():
        for t in tensors:
            dist.broadcast(t.data, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object) on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank (on every rank); ``[obj]`` for one process."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over ranks (every rank gets it): lets all ranks agree, e.g. to stop on a signal."""
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    """Wait until every rank reaches this point (no-op for one process)."""
    if _active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. a dataset download into a shared directory)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _collective_device() -> torch.device:
    """Where small collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
