"""``Method``: one entry of the registry of training methods (its name, attacks, settings and train function)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import LoopConfig
from ..engine import TrainResult
from ..engine.resume import Checkpointing

__all__ = ["Method", "TrainFn"]


class TrainFn(Protocol):
    """How a method trains: ``model`` in place on ``train_data`` with ``attacks`` over ``loop``; ``settings``
    holds only names the method declares (``Method.settings``), checked by ``metaadv.train``."""

    def __call__(
        self,
        model: nn.Module,
        train_data: Dataset | tuple[Tensor, Tensor],
        attacks: Any,
        loop: LoopConfig,
        settings: Mapping[str, Any],
        *,
        progress: bool,
        checkpointing: Checkpointing,
        tensorboard: str | Path | None = None,  # a TensorBoard log directory (None: off)
    ) -> TrainResult: ...


@dataclass(frozen=True)
class Method:
    """A training method as ``metaadv.train`` runs it."""

    name: str  # what ``metaadv.train(name, ...)`` and ``metaadv train --method`` take
    summary: str  # one line: what it trains on, and the paper
    attacks: tuple[int, int | None]  # (min, max) number of attacks it takes; max None: no upper bound
    train: TrainFn
    settings: Mapping[str, Any]  # setting name -> default: the keyword arguments it takes besides the loop's
    meta: bool = False  # meta-training: the settings are MetaConfig fields and one step consumes a meta-batch
