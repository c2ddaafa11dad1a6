"""The task distribution p(T): each attack type is a task; a meta-batch is a sample of tasks.

A task's support and query sets are adversarial examples of its attack, crafted on disjoint clean
examples (see ``split_support_query``).

A task may carry a ``runner`` that crafts in its attack's place (persistent generators,
``meta.options.generators``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .attacks import Attack, make
from .validation import check_int

__all__ = ["AttackDistribution", "AttackTask", "split_support_query"]

EpsRange = tuple[float, float]


@dataclass(frozen=True)
class AttackTask:
    """One task of a meta-batch: an attack (with its eps already drawn) and the index of its type.

    ``runner`` (set by :meth:`PersistentGenerators.bind`): a stateful ``(model_fn, x, y) -> x_adv`` that
    crafts the task's examples instead of ``attack``; not part of the task's identity (equality, hash).
    """

    attack: Attack
    type_index: int
    runner: Callable[[Any, Tensor, Tensor], Tensor] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The task type's name, e.g. ``"pgd_linf"``: equal for every eps drawn from one type."""
        return self.attack.name

    def __call__(self, model_fn: Any, x: Tensor, y: Tensor, *, check: bool = True) -> Tensor:
        """Adversarial examples of this task: ``x`` (B, C, H, W) in [0, 1] -> x_adv of the same shape.
        ``check=False``: inputs already checked (``Attack.__call__``; a runner checks nothing)."""
        return self.attack(model_fn, x, y, check=check) if self.runner is None else self.runner(model_fn, x, y)


class AttackDistribution:
    """A weighted distribution over attack types, each type a task.

    Args:
        specs: attack specs (strings like ``"pgd_linf(eps=0.3, steps=10)"``, dicts or Attacks); one task type each.
        weights: non-negative sampling weights, one per spec (default uniform); normalized to sum to 1.
        eps_ranges: optional per-type ``(low, high)`` eps range; a sampled task draws eps uniformly from
            it instead of using the spec's eps. A list aligned with ``specs`` (``None`` entries keep the
            spec's eps) or a dict from spec index to range.
        seed: seed of the distribution's own random generator (``None``: nondeterministic).

    Held-out attacks are simply those not in the distribution.
    """

    def __init__(
        self,
        specs: Sequence[str | Mapping[str, Any] | Attack],
        weights: Sequence[float] | None = None,
        eps_ranges: Sequence[EpsRange | None] | Mapping[int, EpsRange] | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(specs, (str, Mapping, Attack)) or not isinstance(specs, Sequence):
            raise TypeError("specs must be a list of attack specs, e.g. ['fgsm(eps=0.3)', 'pgd_linf(eps=0.3)']")
        if len(specs) == 0:
            raise ValueError("an AttackDistribution needs at least one attack spec, got an empty list")
        self.types: tuple[Attack, ...] = tuple(make(s) for s in specs)
        self.weights = self._check_weights(weights, len(self.types))
        self.eps_ranges = self._check_ranges(eps_ranges)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.seed()))

    def _check_weights(self, weights: Sequence[float] | None, n: int) -> Tensor:
        if weights is None:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        if w.shape != (n,):
            raise ValueError(f"weights must have one entry per spec ({n}), got {len(w)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
        return w / w.sum()

    def _check_ranges(self, ranges: Any) -> tuple[EpsRange | None, ...]:
        n = len(self.types)
        if ranges is None:
            return (None,) * n
        if isinstance(ranges, Mapping):
            bad = [k for k in ranges if not isinstance(k, int) or not 0 <= k < n]
            if bad:
                raise ValueError(f"eps_ranges keys must be spec indices in 0..{n - 1}, got {bad}")
            ranges = [ranges.get(i) for i in range(n)]
        if len(ranges) != n:
            raise ValueError(f"eps_ranges must have one entry per spec ({n}), got {len(ranges)}")
        checked = []
        for attack, r in zip(self.types, ranges, strict=True):
            if r is None:
                checked.append(None)
                continue
            if "eps" not in attack.params:
                raise ValueError(f"eps_ranges given for {attack.spec!r}, which has no eps parameter")
            lo, hi = (float(v) for v in r)
            if not 0 < lo <= hi:
                raise ValueError(f"eps range for {attack.spec!r} must satisfy 0 < low <= high, got {tuple(r)}")
            checked.append((lo, hi))
        return tuple(checked)

    def __len__(self) -> int:
        return len(self.types)

    def __repr__(self) -> str:
        return f"AttackDistribution({[a.spec for a in self.types]}, weights={self.weights.tolist()})"

    def sample(self, n: int, *, replace: bool = True, generator: torch.Generator | None = None) -> list[AttackTask]:
        """Draw a meta-batch of ``n`` tasks (types by weight; eps drawn from its range when one is set).

        Without replacement, ``n`` may not exceed the number of types with non-zero weight.
        ``generator`` overrides the distribution's own (``meta_train`` passes its seeded one).
        """
        check_int(n, "n", meaning="tasks per meta-batch")
        available = int((self.weights > 0).sum())
        if not replace and n > available:
            raise ValueError(f"cannot sample {n} distinct tasks from {available} attack types; use replace=True")
        g = generator if generator is not None else self.generator
        idx = torch.multinomial(self.weights, n, replacement=replace, generator=g).tolist()
        tasks = []
        for i in idx:
            attack, r = self.types[i], self.eps_ranges[i]
            if r is not None:
                eps = r[0] + (r[1] - r[0]) * float(torch.rand((), generator=g, dtype=torch.float64))
                attack = attack.replace(eps=eps)
            tasks.append(AttackTask(attack, i))
        return tasks

    def state_dict(self) -> dict[str, Tensor]:
        """The sampler's random state (for exact resume)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


def split_support_query(
    x: Tensor, y: Tensor, n_tasks: int, support_size: int, query_size: int
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Split a batch into ``n_tasks`` disjoint (x_support, y_support, x_query, y_query) chunks.

    ``x`` (B, C, H, W) with B >= n_tasks * (support_size + query_size); extra examples are unused.
    """
    per_task = support_size + query_size
    if support_size < 1 or query_size < 1:
        raise ValueError(f"support_size and query_size must be >= 1, got {support_size} and {query_size}")
    if n_tasks * per_task > len(x):
        raise ValueError(
            f"a meta-batch of {n_tasks} tasks x ({support_size} support + {query_size} query) needs "
            f"{n_tasks * per_task} examples, but the batch has {len(x)}"
        )
    chunks = []
    for i in range(n_tasks):
        s = slice(i * per_task, i * per_task + support_size)
        q = slice(i * per_task + support_size, (i + 1) * per_task)
        chunks.append((x[s], y[s], x[q], y[q]))
    return chunks
