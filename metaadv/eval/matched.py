"""Matched adaptation (``evaluate(..., adapt_methods=("matched",), inner_loop=spec)``): a meta-trained model adapted
at test time with exactly the inner loop it was meta-trained with.

The BatchNorm rule (docs/adaptation.md): during the K inner steps the BatchNorm layers, and only they, are in
training mode, so every forward pass normalizes with the batch statistics of the adversarial support set, as the
inner loop of meta-training does; the running statistics those passes update are scratch copies (set k of a
per-step-BN run for step k), thrown away. Dropout and meta-dropout stay in eval mode (no noise). The adapted model
is then evaluated in eval mode with running statistics: the model's own, or set K of a per-step-BN run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..config import MetaConfig
from ..functional import batchnorm_training, clone_buffers, detach, model_fn
from ..meta.inner import LearningRate, adapt
from ..meta.options import artifact_eval_options
from ..meta.options.step_bn import StepBatchNorm
from ..types import ModelFn, Params
from ..validation import check_positive

__all__ = ["InnerLoopSpec", "matched_model"]


@dataclass(frozen=True)
class InnerLoopSpec:
    """The inner loop a model was meta-trained with, for ``evaluate``'s ``"matched"`` adaptation.

    Attributes:
        steps: K, the inner SGD steps (``MetaConfig.inner_steps``, >= 0).
        lr: the step size (``MetaConfig.inner_lr``), or Meta-SGD's learned one: a tensor per adapted parameter,
            shaped like it (the run's ``inner_lr`` artifact).
        inner_params: ``"all"`` or ``"head"`` (ANIL), as ``MetaConfig.inner_params``.
        proximal: the proximal weight lambda >= 0 (``MetaConfig.proximal``).
        step_bn: a per-step-BN run's statistics (sets 1..K; ``TrainResult.step_bn``), else None.
    """

    steps: int
    lr: LearningRate
    inner_params: str = "all"
    proximal: float = 0.0
    step_bn: StepBatchNorm | None = None

    def __post_init__(self) -> None:
        check_positive(self.steps, "InnerLoopSpec.steps", allow_zero=True, integer=True)
        if not isinstance(self.lr, Mapping):
            check_positive(self.lr, "InnerLoopSpec.lr")
        if self.step_bn is not None and self.step_bn.steps != self.steps:
            raise ValueError(
                f"step_bn holds statistics for {self.step_bn.steps} inner steps, the spec takes {self.steps}"
            )

    @classmethod
    def from_config(cls, config: MetaConfig, artifacts: Mapping[str, Any] | None = None) -> InnerLoopSpec:
        """The inner loop of a run meta-trained with ``config``; ``artifacts``: what its options learned
        (``TrainResult.artifacts``): Meta-SGD's step sizes replace ``inner_lr``, per-step BN adds its sets.
        ValueError if the config and the artifacts disagree (a Meta-SGD or per-step-BN run without its artifact)."""
        if not isinstance(config, MetaConfig):
            raise TypeError(f"config must be a MetaConfig, got {type(config).__name__}")
        found = artifact_eval_options(artifacts or {})
        for field, key, artifact in (("learn_inner_lr", "adapt_lr", "inner_lr"), ("per_step_bn", "step_bn", "step_bn")):
            if getattr(config, field) != (key in found):
                have = "has" if key in found else "lacks"
                raise ValueError(f"MetaConfig.{field}={getattr(config, field)} but the artifacts {have} {artifact!r}: "
                                 "pass the run's own TrainResult.artifacts")  # fmt: skip
        return cls(config.inner_steps, found.get("adapt_lr", config.inner_lr), config.inner_params, config.proximal,
                   found.get("step_bn"))  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """JSON values for a report's ``meta``: the settings, ``lr`` as ``"learned"`` for Meta-SGD's."""
        lr = "learned" if isinstance(self.lr, Mapping) else self.lr
        return {"steps": self.steps, "lr": lr, "inner_params": self.inner_params, "proximal": self.proximal,
                "step_bn": self.step_bn is not None, "bn": "support batch statistics in the inner steps"}  # fmt: skip


def matched_model(
    model: nn.Module,
    params: Params,
    step_sets: list[Params],
    x_s: Tensor,
    y_s: Tensor,
    *,
    steps: int,
    lr: LearningRate,
    inner_params: str,
    proximal: float,
) -> ModelFn:
    """The eval-mode model after the meta-training inner loop on the adversarial support set ``(x_s, y_s)``
    (S, C, H, W), (S,): ``steps`` first-order SGD steps (the adapted values equal second order's; no meta-gradient
    is needed) with BatchNorm in training mode on scratch copies of ``step_sets[min(k, K)]`` for step k, then
    normalized with ``step_sets[-1]`` (module docstring)."""
    per_step = [clone_buffers(step_sets[min(k, len(step_sets) - 1)]) for k in range(steps)]
    with batchnorm_training(model):
        theta = adapt(model, x_s, y_s, params=params, buffers=per_step, steps=steps, lr=lr, first_order=True,
                      inner_params=inner_params, proximal=proximal)  # fmt: skip
    return model_fn(model, detach(theta), step_sets[-1])
