"""Adversarial-example reuse: a per-task-type pool of crafted support/query sets (``MetaConfig.reuse_every``).

Attacks are most of the cost of a meta-step. With ``reuse_every = R > 1``, a task type's sets are
crafted at most once every R meta-steps: a meta-step that samples a type whose stored sets are younger
than R steps trains on those sets (crafted against earlier meta-parameters, from earlier clean
examples) and skips its attack; the clean examples the step drew for that task go unused. A type's
sets are crafted afresh, and stored, when it has none or they are R steps old. ``R = 1`` crafts every
time (the plain algorithm). A meta-batch holding one type several times (``sample_replace``) keeps one
entry per occurrence: key (type index, occurrence), so its tasks do not collapse onto one set. The pool
is saved in checkpoints, so a resumed run repeats exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch

from ...tasks import AttackTask
from ...validation import check_int
from ..sets import TaskSets
from .base import MetaOption, OptionSetup

__all__ = ["AdversarialPool"]

Key = tuple[int, int]  # (task type index, occurrence of that type in the meta-batch)


def _key(text: str) -> Key:
    i, k = text.split(".")
    return int(i), int(k)


class AdversarialPool(MetaOption):
    """Crafted ``TaskSets`` per key (task type index, occurrence in the meta-batch) and the step of their crafting.

    As a meta option (``MetaConfig.reuse_every > 1``) it hands the crafting stage the fresh sets it holds, stores
    those crafted afresh, and records per task whether it was attacked (``crafted``); a skipped meta-step
    puts the pool back as it was (the sets crafted against a non-finite model are not kept).
    """

    field, name, distributed, volatile = "reuse_every", "adversarial_pool", False, True

    def __init__(self, every: int, device: torch.device | str = "cpu") -> None:
        check_int(every, "reuse_every")
        self.every, self.device = every, torch.device(device)
        self.entries: dict[Key, tuple[int, TaskSets]] = {}  # key -> (crafted at step, sets)
        self.last_crafted: list[bool] = []  # per task of the latest meta-step: attacked afresh

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.reuse_every > 1

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> AdversarialPool:
        return cls(config.reuse_every, setup.like.device)

    def reused(self, tasks: Sequence[AttackTask], step: int | None) -> dict[int, TaskSets]:
        if step is None:
            raise ValueError("MetaConfig.reuse_every > 1 needs the meta-step index: pass step=")
        found = {i: self.fresh(key, step) for i, key in enumerate(self.keys([t.type_index for t in tasks]))}
        self.last_crafted = [s is None for s in found.values()]
        return {i: s for i, s in found.items() if s is not None}

    def crafted(self, tasks: Sequence[AttackTask], step: int | None, sets: Mapping[int, TaskSets]) -> None:
        keys = self.keys([t.type_index for t in tasks])
        for i, s in sets.items():
            self.put(keys[i], step, s)  # type: ignore[arg-type]

    def record(self) -> dict[str, Any]:
        return {"crafted": self.last_crafted}

    def fresh(self, key: Key, step: int) -> TaskSets | None:
        """The stored sets of ``key`` if crafted fewer than ``every`` steps before ``step``, else None."""
        entry = self.entries.get(key)
        if entry is None or step - entry[0] >= self.every:
            return None
        return entry[1]

    def put(self, key: Key, step: int, sets: TaskSets) -> None:
        """Store the sets of ``key`` crafted at meta-step ``step``."""
        self.entries[key] = (step, sets)

    @staticmethod
    def keys(type_indices: Sequence[int]) -> list[Key]:
        """The key of each task of a meta-batch: (type index, how many tasks of that type came before it)."""
        seen: dict[int, int] = {}
        out = []
        for i in type_indices:
            out.append((i, seen.get(i, 0)))
            seen[i] = seen.get(i, 0) + 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            f"{i}.{k}": {"step": step, **{f.name: getattr(sets, f.name) for f in fields(TaskSets)}}
            for (i, k), (step, sets) in self.entries.items()
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore saved entries (checkpoints load on the CPU), moved to this pool's device."""
        names = [f.name for f in fields(TaskSets)]  # a field missing from an older checkpoint: None
        self.entries = {
            _key(i): (int(e["step"]), TaskSets(*(None if e.get(n) is None else e[n].to(self.device) for n in names)))
            for i, e in saved.items()
        }
