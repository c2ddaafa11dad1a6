"""Meta-SGD (``MetaConfig.learn_inner_lr``; Li et al. 2017): a learned inner step size per parameter entry.

The inner update becomes theta_i' = theta - alpha (.) grad L(f_theta, S_i), with alpha a tensor shaped like
each adapted parameter, initialized to ``inner_lr`` and meta-learned by the outer optimizer (its own group,
without weight decay; counted in the gradient norm). Evaluation adapts with the learned alpha
(``evaluate(..., adapt_lr=result.inner_lr)``; ``metaadv eval`` reads it from the run directory).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ...engine import NamedTensors
from ...functional import Params
from ..inner import init_inner_lr
from .base import InnerLoop, MetaOption, OptionSetup

__all__ = ["MetaSGD"]


class MetaSGD(MetaOption):
    """The learned step sizes ``lr`` (adapted parameter name -> tensor shaped like it, leaves with gradients)."""

    field, name, artifact_name = "learn_inner_lr", "inner_lr", "inner_lr"

    def __init__(self, lr: Mapping[str, Tensor]) -> None:
        self.lr: Params = dict(lr)
        self._state = NamedTensors(self.lr)

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.learn_inner_lr

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> MetaSGD:
        return cls(init_inner_lr(setup.model, config.inner_lr, config.inner_params))

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.lr.values()), "weight_decay": 0.0}]

    def state_dict(self) -> dict[str, Tensor]:
        return self._state.state_dict()

    def load_state_dict(self, saved: Mapping[str, Tensor]) -> None:
        self._state.load_state_dict(saved)

    def inner_loop(self, loop: InnerLoop) -> InnerLoop:
        return loop.replace(settings={**loop.settings, "lr": self.lr})

    def artifact(self) -> Params:
        return {k: v.detach() for k, v in self.lr.items()}

    @classmethod
    def save_artifact(cls, artifact: Mapping[str, Tensor]) -> Params:
        return {k: v.detach().clone() for k, v in artifact.items()}

    @classmethod
    def load_artifact(cls, model: nn.Module, saved: Mapping[str, Tensor]) -> Params:
        return dict(saved)

    @classmethod
    def eval_options(cls, artifact: Mapping[str, Tensor]) -> dict[str, Any]:
        return {"adapt_lr": artifact}
