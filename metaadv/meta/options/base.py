"""The meta-option protocol: what one option of meta-training (``MetaConfig``) may do, and where.

An option is built from the config when its field turns it on (``enabled``, ``build``); it may wrap the model
(``wrap``), add parameter groups to the meta-optimizer (``param_groups``), own state (``state_dict`` /
``load_state_dict``: checkpointed under ``name``; rolled back after a skipped step when ``volatile``), and act
at the points of a meta-step, in this order:

    bind           the sampled tasks                          (persistent generators)
    reused         crafting: sets to take instead of attacking (the reuse pool), and ``crafted`` after it
    attack_buffers crafting: the buffers the attacks target, some per task (FiLM type codes)
    inner_loop     the inner loop's settings and buffers for the meta-step (Meta-SGD, per-step BN)
    task_loop      the same, with entries per task            (FiLM codes)
    observe        the crafted sets, after the task losses    (per-type BN statistics)
    aggregate      the task losses -> the meta-loss           (task attention)
    logged         tensors for the step's record              (the adaptation gap)

Its ``artifact`` is what evaluation adapts with (``TrainResult.artifacts[artifact_name]``; the run directory
saves it with ``save_artifact`` / ``load_artifact``; ``eval_options`` turns it into ``evaluate``'s arguments).
Whether it runs in the task-batched meta-step and under torchrun it declares (``batched``, ``distributed``,
``refusal``); ``options.check`` enforces that for every option in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...functional import Params
from ...tasks import AttackDistribution, AttackTask
from ..batched import task_row
from ..sets import TaskSets

__all__ = ["Aggregate", "InnerLoop", "MetaOption", "OptionSetup", "TaskBuffers"]


@dataclass(frozen=True)
class OptionSetup:
    """What an option is built from, besides the config."""

    model: nn.Module  # the (wrapped) model being meta-trained, on its device
    buffers: Params  # its buffers (the dicts ``state(model)`` returns)
    tasks: AttackDistribution  # the task distribution
    like: Tensor  # (0, C, H, W): the training images' channels, size, dtype and device


@dataclass(frozen=True)
class InnerLoop:
    """How a task is adapted and queried: ``adapt``'s keyword arguments (``settings``), the buffers of the query
    pass (its running statistics are updated) and those of an attack against the adapted copy."""

    settings: Mapping[str, Any]  # steps, lr, first_order, inner_params, proximal (and buffers, if given)
    buffers: Params  # the model's own buffers
    query_buffers: Params
    attack_buffers: Params
    per_task: frozenset[str] = frozenset()  # buffers given per task (a list of T tensors) in every dict above

    def replace(self, **changes: Any) -> InnerLoop:
        return replace(self, **changes)

    def for_task(self, i: int) -> InnerLoop:
        """Task ``i``'s loop: its row of every per-task buffer."""
        if not self.per_task:
            return self
        steps = self.settings.get("buffers")
        settings = dict(self.settings)
        if steps is not None:
            settings["buffers"] = task_row(steps, self.per_task, i) if isinstance(steps, Mapping) else [
                task_row(b, self.per_task, i) for b in steps]  # fmt: skip
        query, attack = task_row(self.query_buffers, self.per_task, i), task_row(self.attack_buffers, self.per_task, i)
        return replace(self, settings=settings, query_buffers=query, attack_buffers=attack, per_task=frozenset())

    def stacked(self) -> InnerLoop:
        """The loop for the task-batched step: every per-task buffer as one (T, *shape) tensor."""
        if not self.per_task:
            return self
        steps = self.settings.get("buffers")
        settings = dict(self.settings)
        if steps is not None:
            settings["buffers"] = _stacked(steps, self.per_task) if isinstance(steps, Mapping) else [
                _stacked(b, self.per_task) for b in steps]  # fmt: skip
        return replace(self, settings=settings, query_buffers=_stacked(self.query_buffers, self.per_task),
                       attack_buffers=_stacked(self.attack_buffers, self.per_task))  # fmt: skip


@dataclass(frozen=True)
class TaskBuffers:
    """Buffers with some entries given per task, a list of T tensors (``per_task``), e.g. FiLM's task codes."""

    buffers: Params
    per_task: frozenset[str]

    def of(self, i: int) -> Params:
        """Task ``i``'s buffers."""
        return task_row(self.buffers, self.per_task, i)

    def stacked(self) -> Params:
        """The buffers with every per-task entry as one (T, *shape) tensor."""
        return _stacked(self.buffers, self.per_task)


def _stacked(buffers: Mapping[str, Any], per_task: frozenset[str]) -> Params:
    return {k: torch.stack(list(v)) if k in per_task else v for k, v in buffers.items()}


@dataclass(frozen=True)
class Aggregate:
    """An option's meta-loss over the task losses: ``weights`` (T,) replace the mean (detached in the loss; None:
    keep them), ``objective`` is added to what is back-propagated (an option's own loss; the objectives of
    several options add up), and ``logged`` tensors land in the step's record."""

    weights: Tensor | None = None
    objective: Tensor | None = None
    logged: dict[str, Tensor] = field(default_factory=dict)


class MetaOption:
    """Base of every meta option: each hook does nothing until an option overrides it (module docstring)."""

    field: ClassVar[str]  # the MetaConfig field that turns it on
    name: ClassVar[str]  # its state's name in checkpoints
    artifact_name: ClassVar[str | None] = None  # its artifact's name in TrainResult.artifacts and meta_state.pt
    batched: ClassVar[bool] = True  # runs in the task-batched meta-step (MetaConfig.batched)
    distributed: ClassVar[bool] = True  # runs under torchrun (tasks split over processes)
    volatile: ClassVar[bool] = False  # a meta-step changes its state outside the optimizer: rolled back when skipped

    @classmethod
    def enabled(cls, config: Any) -> bool:
        raise NotImplementedError

    @classmethod
    def refusal(cls, config: Any, world: int) -> str | None:
        """Why this option cannot run with ``config`` on ``world`` processes (None: it can)."""
        if config.batched and not cls.batched:
            return (
                f"MetaConfig.{cls.field}={getattr(config, cls.field)!r} needs the looped meta-step: set batched=False"
            )
        if world > 1 and not cls.distributed:
            return (f"MetaConfig.{cls.field}={getattr(config, cls.field)!r} is not supported under torchrun (it needs "
                    "every rank's tasks and state); use one process")  # fmt: skip
        return None

    @classmethod
    def wrap(cls, model: nn.Module, config: Any, n_types: int) -> nn.Module:
        """The module meta-trained instead of ``model`` (called before ``build``, only when enabled)."""
        return model

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> MetaOption:
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of its own for the meta-optimizer (they count in the gradient norm)."""
        return []

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, saved: Any) -> None:
        return None

    @property
    def stateful(self) -> bool:
        """Whether it has state to checkpoint (it overrides ``state_dict``)."""
        return type(self).state_dict is not MetaOption.state_dict

    def artifact(self) -> Any:
        """What evaluation adapts with, or None."""
        return None

    # --- hooks of the meta-step, in the order it calls them ---------------------------------------------------

    def bind(self, tasks: Sequence[AttackTask]) -> list[AttackTask]:
        return list(tasks)

    def reused(self, tasks: Sequence[AttackTask], step: int | None) -> dict[int, TaskSets]:
        """Task index -> sets to train on without crafting them."""
        return {}

    def crafted(self, tasks: Sequence[AttackTask], step: int | None, sets: Mapping[int, TaskSets]) -> None:
        """The sets crafted this meta-step, by task index."""

    def attack_buffers(
        self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask]
    ) -> TaskBuffers | None:
        """The buffers the tasks' attacks target while crafting, some per task (None: the model's)."""
        return None

    def inner_loop(self, loop: InnerLoop) -> InnerLoop:
        return loop

    def task_loop(
        self, model: nn.Module, params: Params, tasks: Sequence[AttackTask], sets: Sequence[TaskSets], loop: InnerLoop
    ) -> InnerLoop:
        """The meta-step's loop with entries per task (``InnerLoop.per_task``)."""
        return loop

    def observe(self, model: nn.Module, params: Params, tasks: Sequence[AttackTask], sets: Sequence[TaskSets]) -> None:
        """The meta-step's sets, at the meta-parameters (before the update)."""

    def aggregate(self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask],
                  sets: Sequence[TaskSets], losses: Tensor, query_loss: Tensor,
                  query_acc: Tensor) -> Aggregate | None:  # fmt: skip
        return None

    def logged(self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask],
               sets: Sequence[TaskSets], query_acc: Tensor) -> dict[str, Tensor]:  # fmt: skip
        """Tensors for the meta-step's record, read with the step's other values (no extra host sync)."""
        return {}

    def record(self) -> dict[str, Any]:
        """Host-side entries for the meta-step's record."""
        return {}

    # --- evaluation -------------------------------------------------------------------------------------------

    @classmethod
    def save_artifact(cls, artifact: Any) -> Any:
        """The artifact as tensors and plain values for a run directory's ``meta_state.pt`` (None: not saved)."""
        return None

    @classmethod
    def load_artifact(cls, model: nn.Module, saved: Any) -> Any:
        """The artifact from ``save_artifact``'s value, for ``model`` (the run's rebuilt, wrapped model)."""
        raise NotImplementedError(f"{cls.__name__} saves no artifact")

    @classmethod
    def eval_options(cls, artifact: Any) -> dict[str, Any]:
        """``evaluate``'s keyword arguments that adapt with the artifact."""
        return {}
