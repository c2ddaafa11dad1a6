"""Stacking and concatenating without copies, and host values sent to the device without a host sync.

A task-batched step handles many tensors that are slices of one: each task's support and query sets are
slices of the meta-batch and of its attack group's output. ``stack_rows`` and ``cat_rows`` return views when
their inputs are such slices (a GPU launches nothing for a view) and copy otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["cat_rows", "stack_rows", "to_device"]


def _views_of_one(tensors: Sequence[Tensor]) -> bool:
    """Whether the tensors are equally shaped and strided views of one storage, none tracking gradients."""
    first = tensors[0]
    ptr = first.untyped_storage().data_ptr()
    return all(
        t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype and not t.requires_grad
        and t.untyped_storage().data_ptr() == ptr
        for t in tensors
    )  # fmt: skip


def stack_rows(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack(tensors)`` (T, *shape): a view when the tensors are equally spaced slices of one tensor."""
    first = tensors[0]
    offsets = [t.storage_offset() for t in tensors]
    step = offsets[1] - offsets[0] if len(offsets) > 1 else first.numel()
    if step < 0 or not _views_of_one(tensors) or any(b - a != step for a, b in itertools.pairwise(offsets)):
        return torch.stack(list(tensors))
    return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), offsets[0])


def cat_rows(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat(tensors)`` along dim 0: a view when the tensors are adjacent contiguous slices of one tensor
    (each starts where the previous ends), as a task's support and query chunks of the meta-batch are."""
    first = tensors[0]
    if len(tensors) == 1:
        return first
    ptr, end = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.requires_grad or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
                or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != end):  # fmt: skip
            return torch.cat(list(tensors))
        end += t.numel()
    rows = sum(len(t) for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """A host tensor copied to ``device`` without the host waiting: pinned and non-blocking on CUDA (a copy
    from pageable memory synchronizes the stream)."""
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)
