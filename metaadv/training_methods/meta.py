"""The meta methods: ``meta`` (MAML over the attack types, every ``MetaConfig`` field a setting), ``meta_fo``
and ``meta_so`` (the same, first- or second-order), trained by ``metaadv.meta.meta_train``.

The loop's fields map onto ``MetaConfig``'s (``config.LOOP_FIELDS``; the other fields are the meta methods'
settings); one step consumes a meta-batch of ``tasks_per_batch * (support_size + query_size)`` examples, which
must be the loop's ``batch_size``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..attacks import Attack
from ..config import LOOP_FIELDS, LoopConfig, MetaConfig
from ..engine import TrainResult
from ..engine.resume import Checkpointing
from ..meta import meta_train
from ..tasks import AttackDistribution
from .method import Method

__all__ = ["METHODS", "PINNED", "default_loop", "meta_config", "settings_of"]

# method -> the MetaConfig fields it fixes (not settings of that method)
PINNED: dict[str, dict[str, Any]] = {"meta": {}, "meta_fo": {"first_order": True}, "meta_so": {"first_order": False}}
_SUMMARIES = {
    "meta": "meta-adversarial training: MAML over the attack types, as MetaConfig says",
    "meta_fo": "meta with first-order meta-gradients (first_order=True)",
    "meta_so": "meta with exact second-order meta-gradients (first_order=False)",
}


def settings_of(method: str, config: MetaConfig) -> dict[str, Any]:
    """The settings of meta method ``method`` that ``config`` holds: its fields that are neither the loop's
    (``config.loop`` has those) nor fixed by the method (``first_order`` for ``meta_fo`` / ``meta_so``)."""
    return {k: v for k, v in config.to_dict().items() if k not in LOOP_FIELDS and k not in PINNED[method]}


def meta_config(method: str, loop: LoopConfig, settings: Mapping[str, Any]) -> MetaConfig:
    """The ``MetaConfig`` that meta method ``method`` trains with, from ``loop`` and its ``settings``;
    ValueError if the loop's batch is not one meta-batch."""
    if loop.max_bad_steps is None:
        raise ValueError(f"loop.max_bad_steps=None is not available to method {method!r}: it must be an integer >= 1")
    config = MetaConfig(**settings, **PINNED[method], **{f: getattr(loop, name) for f, name in LOOP_FIELDS.items()})
    if loop.batch_size != config.examples_per_step:
        raise ValueError(
            f"loop.batch_size={loop.batch_size}, but a step of method {method!r} consumes one meta-batch of "
            f"tasks_per_batch * (support_size + query_size) = {config.tasks_per_batch} * ({config.support_size} + "
            f"{config.query_size}) = {config.examples_per_step} examples: set batch_size={config.examples_per_step}"
        )
    return config


def default_loop(settings: Mapping[str, Any]) -> LoopConfig:
    """The loop of a meta method called without one: ``LoopConfig``'s defaults, one meta-batch per step."""
    return MetaConfig(**settings).loop


def _train(
    method: str,
    model: nn.Module,
    train_data: Dataset | tuple[Tensor, Tensor],
    attacks: AttackDistribution | Sequence[str | Attack],
    loop: LoopConfig,
    settings: Mapping[str, Any],
    *,
    progress: bool,
    checkpointing: Checkpointing,
    tensorboard: str | Path | None = None,
) -> TrainResult:
    """``meta_train`` with the config of ``method``, ``loop`` and ``settings``; ``attacks``: an
    ``AttackDistribution``, or specs of one (uniform weights, seeded with ``loop.seed``)."""
    config = meta_config(method, loop, settings)
    if not isinstance(attacks, AttackDistribution):
        attacks = AttackDistribution(attacks, seed=loop.seed)
    return meta_train(model, train_data, attacks, config, progress=progress, checkpoint_dir=checkpointing.directory,
                      checkpoint_every=checkpointing.every, keep_last=checkpointing.keep_last,
                      resume=checkpointing.resume, tensorboard=tensorboard)  # fmt: skip


def _method(name: str) -> Method:
    fields = (f for f in dataclasses.fields(MetaConfig) if f.name not in LOOP_FIELDS and f.name not in PINNED[name])
    return Method(name, _SUMMARIES[name], (1, None), partial(_train, name), {f.name: f.default for f in fields},
                  meta=True)  # fmt: skip


METHODS = tuple(_method(name) for name in PINNED)
