"""One task's examples in a meta-step: its adversarial support set and its query set."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["TaskSets"]


@dataclass(frozen=True)
class TaskSets:
    """One task's examples for the loss stage."""

    support: Tensor  # (S, C, H, W) adversarial support examples
    support_y: Tensor  # (S,)
    query: Tensor | None  # (Q, C, H, W) adversarial query examples; None: crafted against the adapted copy
    query_clean: Tensor  # (Q, C, H, W) the clean query examples
    query_y: Tensor  # (Q,)
    support_clean: Tensor | None = None  # (S, C, H, W) the clean support examples (read by task_encoding='support')
