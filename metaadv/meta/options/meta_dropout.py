"""Meta-dropout (``MetaConfig.meta_dropout``): a learned per-channel dropout after every BatchNorm layer.

After each BatchNorm layer of the base model the features h (B, C, ...) of a training-mode forward pass become

    h' = h * m / k,   k = sigmoid(l),   m = sigmoid((l + log u - log(1 - u)) / tau),   u ~ U(0, 1)^(B, C, 1, ...)

with one learned logit vector l (C,) per layer, initialized to logit(1 - p): inverted dropout with a learnable
keep probability k per channel, the mask m drawn from a relaxed Bernoulli(k) distribution at temperature tau
(reparameterized, so differentiable in l; E[m] -> k as tau -> 0). The logits are ordinary parameters of the
wrapper: with ``inner_params="all"`` the inner loop adapts them per task and the outer loop meta-learns their
start; with ``"head"`` they are meta-learned only. The noise comes from the global torch RNG. In eval mode the
wrapper is the base model (no noise), so evaluation and its attacks are deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from ...validation import check_positive
from .base import MetaOption, OptionSetup

__all__ = ["MetaDropout", "MetaDropoutOption"]


class MetaDropout(nn.Module):
    """Wrap ``model`` with a learned per-channel relaxed-Bernoulli dropout after each of its BatchNorm layers.

    Args:
        model: the base classifier, images -> logits (B, K); it must have at least one BatchNorm layer
            (``nn.BatchNorm1d/2d/3d``), whose output channels (dimension 1) are masked.
        p: initial drop probability in (0, 1): every keep logit starts at logit(1 - p).
        temperature: tau > 0 of the relaxed Bernoulli mask (smaller: closer to a hard 0/1 mask).

    Parameters: ``keep_logits.i`` (C_i,) for the i-th BatchNorm layer in ``model.modules()`` order, registered
    before ``model`` so that the base model's classifier stays the ``"head"`` of ``inner.inner_parameter_names``;
    the base model's parameters and buffers keep their names under ``model.``. The masks are applied by forward
    hooks that live only while the wrapper's own training-mode forward runs and read the logits by attribute,
    so ``torch.func.functional_call(wrapper, {...})`` uses the logits it is given, and the base model called
    on its own is left plain. In eval mode the output is the base model's times an exact 1 that keeps the
    logits in the autograd graph with a zero gradient (so ``adapt`` of all parameters runs in eval mode too).
    """

    def __init__(self, model: nn.Module, p: float, temperature: float = 0.1) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_positive(p, "p")
        if p >= 1:
            raise ValueError(f"p must be in (0, 1), got {p!r}")
        check_positive(temperature, "temperature")
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            raise ValueError(f"MetaDropout masks the outputs of BatchNorm layers, but {type(model).__name__} has none")
        like = next(model.parameters(), torch.empty(0))
        start = math.log((1 - p) / p)  # logit(1 - p)
        # Registered before the model: named_parameters() lists the logits first, the base model's head last.
        self.keep_logits = nn.ParameterList(
            nn.Parameter(torch.full((m.num_features,), start, dtype=like.dtype, device=like.device)) for m in norms
        )
        self.model = model
        self.p, self.temperature = float(p), float(temperature)
        self._norms = norms  # a plain list, not submodules: the layers are registered once, under ``model``

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K) of the base model on ``x``, its BatchNorm outputs masked in training mode."""
        if not self.training:
            total = sum(logit.sum() for logit in self.keep_logits)
            return self.model(x) * (1 + 0 * total)  # bit for bit the base model's output
        with contextlib.ExitStack() as hooks:
            for i, norm in enumerate(self._norms):
                hooks.callback(norm.register_forward_hook(functools.partial(self._mask, i)).remove)
            return self.model(x)

    def _mask(self, index: int, module: nn.Module, inputs: tuple[Tensor, ...], h: Tensor) -> Tensor:
        """The features h (B, C, ...) of BatchNorm layer ``index`` times m / k (module docstring)."""
        logit = self.keep_logits[index].view(1, -1, *([1] * (h.dim() - 2)))  # (1, C, 1, ...)
        u = torch.rand(h.shape[0], h.shape[1], *([1] * (h.dim() - 2)), dtype=h.dtype, device=h.device)
        mask = torch.sigmoid((logit + torch.logit(u, eps=1e-6)) / self.temperature)  # (B, C, 1, ...)
        return h * (mask / torch.sigmoid(logit))


class MetaDropoutOption(MetaOption):
    """``MetaConfig.meta_dropout``: the model is wrapped in ``MetaDropout`` (the outermost wrapper);
    its keep logits are parameters of the model, so nothing else changes in the meta-step."""

    field, name = "meta_dropout", "meta_dropout"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.meta_dropout > 0

    @classmethod
    def wrap(cls, model: nn.Module, config: Any, n_types: int) -> nn.Module:
        return MetaDropout(model, config.meta_dropout)

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> MetaDropoutOption:
        return cls()
