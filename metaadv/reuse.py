"""Adversarial-example reuse: a per-task-type pool of crafted support/query sets (``MetaConfig.reuse_every``).

Attacks are most of the cost of a meta-step. With ``reuse_every = R > 1``, a task type's sets are
crafted at most once every R meta-steps: a meta-step that samples a type whose stored sets are younger
than R steps trains on those sets (crafted against earlier meta-parameters, from earlier clean
examples) and skips its attack; the clean examples the step drew for that task go unused. A type's
sets are crafted afresh, and stored, when it has none or they are R steps old. ``R = 1`` crafts every
time (the plain algorithm). The pool is saved in checkpoints, so a resumed run repeats exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch

from .meta import TaskSets

__all__ = ["AdversarialPool"]


class AdversarialPool:
    """Crafted ``TaskSets`` per task type index, each with the meta-step it was crafted at."""

    def __init__(self, every: int, device: torch.device | str = "cpu") -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"reuse_every must be an integer >= 1, got {every!r}")
        self.every, self.device = every, torch.device(device)
        self.entries: dict[int, tuple[int, TaskSets]] = {}  # type index -> (crafted at step, sets)

    def fresh(self, type_index: int, step: int) -> TaskSets | None:
        """The stored sets of ``type_index`` if crafted fewer than ``every`` steps before ``step``, else None."""
        entry = self.entries.get(type_index)
        if entry is None or step - entry[0] >= self.every:
            return None
        return entry[1]

    def put(self, type_index: int, step: int, sets: TaskSets) -> None:
        """Store the sets of ``type_index`` crafted at meta-step ``step`` (detached)."""
        self.entries[type_index] = (step, sets)

    def state_dict(self) -> dict[str, Any]:
        return {
            str(i): {"step": step, **{f.name: getattr(sets, f.name) for f in fields(TaskSets)}}
            for i, (step, sets) in self.entries.items()
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore saved entries (checkpoints load on the CPU), moved to this pool's device."""
        names = [f.name for f in fields(TaskSets)]
        self.entries = {
            int(i): (int(e["step"]), TaskSets(*(None if e[n] is None else e[n].to(self.device) for n in names)))
            for i, e in saved.items()
        }
