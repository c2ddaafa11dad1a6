"""State in the engine's protocol (``state_dict()`` / ``load_state_dict()``): saved in checkpoints, restored
on resume, and snapshot / rolled back around a skipped step."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["NamedTensors", "Stateful", "restore", "snapshot"]


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, saved: Any) -> Any: ...


class NamedTensors:
    """Named tensors (e.g. learned step sizes) in the state protocol: saved as clones, restored in place."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def load_state_dict(self, saved: Mapping[str, Tensor]) -> None:
        if set(saved) != set(self.tensors):
            raise KeyError(f"saved tensors {sorted(saved)}, this run has {sorted(self.tensors)}")
        with torch.no_grad():
            for k, v in self.tensors.items():
                v.copy_(saved[k])  # RuntimeError on a shape mismatch


def snapshot(objects: Mapping[str, Stateful]) -> dict[str, Any]:
    """Deep copies of the objects' states, to put back with ``restore`` (a skipped step changes nothing)."""
    return {name: copy.deepcopy(obj.state_dict()) for name, obj in objects.items()}


def restore(objects: Mapping[str, Stateful], saved: Mapping[str, Any]) -> None:
    for name, obj in objects.items():
        obj.load_state_dict(saved[name])
