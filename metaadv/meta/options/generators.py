"""Persistent generators (``MetaConfig.persistent_generator``): each task type k whose attack is
``generator(eps, steps, lr, width)`` keeps ONE generator G_k (parameters phi_k, with its Adam state) for the
whole run, trained alongside the meta-parameters theta as in a GAN. Each time type k is sampled, on that
task's clean examples (x, y) at its drawn eps:

    phi_k <- phi_k - Adam(grad_phi margin(f_theta(x + delta_phi(x)), y))    (``steps`` times)
    x_adv  = x + delta_phi_k(x),    |delta|_inf <= eps,  x_adv in [0, 1]

and the meta-step then lowers the query loss on x_adv: min_theta max_phi, one alternating step each
(``attacks.generator`` defines delta_phi and the margin loss). Without the option every call fits a
fresh generator. A skipped meta-step undoes the generators' training of that step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ...attacks import GeneratorAttack
from ...tasks import AttackDistribution, AttackTask
from .base import MetaOption, OptionSetup

__all__ = ["PersistentGenerators"]


class PersistentGenerators(MetaOption):
    """One persistent :class:`~metaadv.attacks.GeneratorAttack` per ``generator`` task type of ``tasks``
    (its eps, steps, lr and width from the type's spec), trained at every call for the whole run.

    Args:
        tasks: the task distribution; at least one of its types must be a ``generator(...)`` attack.
        like: a batch (B, C, H, W) of the training images (B may be 0): the generators are built now, for
            its channels, device and dtype, so a checkpoint restores them whether or not their type was sampled.

    ``bind`` attaches them to sampled tasks; ``state_dict``/``load_state_dict`` (every generator and its
    Adam state, keyed by type index) follow the engine's checkpoint protocol.
    """

    field, name, artifact_name, distributed, volatile = "persistent_generator", "generators", "generators", False, True

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.persistent_generator

    @classmethod
    def refusal(cls, config: Any, world: int) -> str | None:
        if world > 1:
            return "MetaConfig.persistent_generator=True is not built under torchrun; use one process"
        return None

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> PersistentGenerators:
        return cls(setup.tasks, setup.like)

    def artifact(self) -> PersistentGenerators:
        return self

    def __init__(self, tasks: AttackDistribution, like: Tensor) -> None:
        if not isinstance(tasks, AttackDistribution):
            raise TypeError(f"tasks must be an AttackDistribution, got {type(tasks).__name__}")
        specs = {i: a.params for i, a in enumerate(tasks.types) if a.name == "generator"}
        self.attacks: dict[int, GeneratorAttack] = {
            i: GeneratorAttack(p["eps"], steps=p["steps"], lr=p["lr"], width=p["width"], like=like)
            for i, p in specs.items()
        }
        if not self.attacks:
            raise ValueError(
                "MetaConfig.persistent_generator=True needs a 'generator(eps=...)' attack type in the task "
                f"distribution, got {[a.spec for a in tasks.types]}"
            )

    def bind(self, tasks: Sequence[AttackTask]) -> list[AttackTask]:
        """``tasks`` (sampled from the distribution given at construction) with each generator task's runner
        set to its type's persistent generator, called with the task's own (drawn) eps; others as they are."""
        bound = []
        for t in tasks:
            gen = self.attacks.get(t.type_index)
            if gen is not None and t.name != "generator":
                raise ValueError(f"task type {t.type_index} is {t.attack.spec!r}, not a generator: tasks of another "
                                 "distribution")  # fmt: skip
            runner = None if gen is None else functools.partial(gen, eps=t.attack.params["eps"])
            bound.append(t if runner is None else dataclasses.replace(t, runner=runner))
        return bound

    def state_dict(self) -> dict[str, Any]:
        return {str(i): gen.state_dict() for i, gen in self.attacks.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {str(i) for i in self.attacks}:
            raise KeyError(f"saved generators for task types {sorted(state)}, this run has {sorted(self.attacks)}")
        for i, gen in self.attacks.items():
            gen.load_state_dict(state[str(i)])
