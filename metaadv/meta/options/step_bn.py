"""Per-step BatchNorm running statistics (``MetaConfig.per_step_bn``; MAML++'s BNRS, Antoniou et al. 2019).

In plain MAML the inner loop's forward passes use scratch statistics and only the query pass at the adapted
parameters theta_i^(K) updates the model's running statistics, so the statistics a model carries (used at
test time, at the meta-parameters) were measured elsewhere. With ``per_step_bn`` a meta-step keeps K + 1
sets of running statistics (K = ``inner_steps``), set k measured at the k-th inner iterate:

    set k   <- (1 - m) * set k + m * batch statistics of f_{theta_i^(k)} on S_i     (k < K: support pass of step k)
    set K   <- (1 - m) * set K + m * batch statistics of f_{theta_i^(K)} on Q_i     (the query pass)

for each task i in turn (m: each layer's BatchNorm momentum). Set 0 is the model's own buffers, so zero-shot
evaluation normalizes with statistics measured at the meta-parameters; sets 1..K live in ``StepBatchNorm``,
which ``meta_train`` checkpoints and returns as ``TrainResult.step_bn``. The forward passes normalize with
their batch's statistics either way (training mode): the sets change which statistics are kept, not the
meta-gradient. ``evaluate(..., step_bn=result.step_bn)`` adapts with them (see ``evaluate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...functional import Params, batchnorm_layers, clone_buffers
from ...validation import check_int
from .base import InnerLoop, MetaOption, OptionSetup

__all__ = ["StepBatchNorm"]


class StepBatchNorm(MetaOption):
    """Running statistics for inner steps 1..K, besides set 0 (the model's own buffers).

    Args:
        model: the model being meta-trained (it must have BatchNorm layers tracking running statistics).
        buffers: the model's buffers; every set starts from a copy of them.
        steps: K, the inner loop's number of steps (``MetaConfig.inner_steps``, >= 0).
    """

    def __init__(self, model: nn.Module, buffers: Mapping[str, Tensor], steps: int) -> None:
        if not batchnorm_layers(model):
            raise ValueError(
                f"MetaConfig.per_step_bn keeps BatchNorm statistics per inner step, but {type(model).__name__} has "
                "no BatchNorm layer tracking running statistics"
            )
        check_int(steps, "steps", minimum=0, meaning="the inner steps K")
        self.stats: list[Params] = [clone_buffers(buffers) for _ in range(steps)]  # sets 1..K: all model buffers

    field, name, artifact_name, distributed, volatile = "per_step_bn", "step_bn", "step_bn", False, True

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.per_step_bn

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> StepBatchNorm:
        return cls(setup.model, setup.buffers, config.inner_steps)

    def inner_loop(self, loop: InnerLoop) -> InnerLoop:
        """The support pass of inner step k updates set k (set 0: the model's buffers), the query pass set K."""
        if loop.settings["steps"] != self.steps:
            raise ValueError(f"step_bn holds statistics for {self.steps} inner steps, the inner loop takes "
                             f"{loop.settings['steps']} (MetaConfig.inner_steps)")  # fmt: skip
        sets = self.sets(loop.buffers)
        return loop.replace(settings={**loop.settings, "buffers": sets[:-1]}, query_buffers=sets[-1])

    def artifact(self) -> StepBatchNorm:
        return self

    @classmethod
    def save_artifact(cls, artifact: StepBatchNorm) -> dict[str, Any]:
        return artifact.state_dict()

    @classmethod
    def load_artifact(cls, model: nn.Module, saved: Mapping[str, Any]) -> StepBatchNorm:
        stats = cls(model, dict(model.named_buffers()), len(saved["stats"]))
        stats.load_state_dict(saved)
        return stats

    @classmethod
    def eval_options(cls, artifact: StepBatchNorm) -> dict[str, Any]:
        return {"step_bn": artifact}

    @property
    def steps(self) -> int:
        """K: the number of inner steps (the sets are 0..K)."""
        return len(self.stats)

    def __repr__(self) -> str:
        return f"StepBatchNorm(steps={self.steps})"

    def sets(self, buffers: Params) -> list[Params]:
        """The K + 1 sets ``[buffers, set 1, ..., set K]``: set k for the forward passes at theta^(k)
        (``buffers``, the model's own, is set 0). The dicts are the stored ones: training-mode passes update them."""
        return [buffers, *self.stats]

    def state_dict(self) -> dict[str, Any]:
        return {"stats": [clone_buffers(s) for s in self.stats]}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        if len(saved["stats"]) != len(self.stats):
            raise ValueError(f"saved statistics are for {len(saved['stats'])} inner steps, this run has {self.steps}")
        with torch.no_grad():
            for mine, theirs in zip(self.stats, saved["stats"], strict=True):
                for k, v in mine.items():
                    v.copy_(theirs[k])
