"""The model as (params, buffers) dicts evaluated with ``torch.func.functional_call``.

A *functional copy* of a model is just a dict of parameter tensors: adapting it never touches the
user's ``nn.Module``. Buffers (BatchNorm running statistics) are passed explicitly, so which forward
pass may update them is always visible at the call site.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from .types import ModelFn, Params

__all__ = [
    "ModelFn",
    "Params",
    "batchnorm_layers",
    "batchnorm_training",
    "call",
    "clone_buffers",
    "detach",
    "eval_mode",
    "model_fn",
    "state",
]


def state(model: nn.Module) -> tuple[Params, Params]:
    """Return ``(params, buffers)``: the module's own tensors by name (not copies)."""
    return dict(model.named_parameters()), dict(model.named_buffers())


def clone_buffers(buffers: Mapping[str, Tensor]) -> Params:
    """Scratch copies of the buffers: a training-mode forward may update them without leaking anywhere."""
    return {k: v.clone() for k, v in buffers.items()}


def detach(params: Mapping[str, Tensor]) -> Params:
    """Detached views of a parameter dict (no gradient flows back through them)."""
    return {k: v.detach() for k, v in params.items()}


def call(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Logits (B, K) of ``model`` at ``params``; a training-mode BatchNorm updates ``buffers`` in place."""
    return functional_call(model, {**params, **buffers}, (x,))


def model_fn(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> ModelFn:
    """A callable ``x -> logits`` for attacks: detached params and scratch buffers, so crafting an attack
    neither builds a graph to the parameters nor moves the running statistics."""
    fixed, scratch = detach(params), clone_buffers(buffers)
    return lambda x: call(model, fixed, scratch, x)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode; afterwards every submodule has its own train/eval flag back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(prefix, layer)`` of every BatchNorm layer tracking running statistics; ``prefix`` starts its
    buffer names (``"features.1."``, ``""`` for a bare BatchNorm model)."""
    return [
        (f"{name}." if name else "", m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


@contextlib.contextmanager
def batchnorm_training(model: nn.Module, *, cumulative: bool = False) -> Iterator[nn.Module]:
    """Run the block with the BatchNorm layers (only) in training mode, so a forward pass updates the running
    statistics it is given; ``cumulative``: with momentum None (a cumulative average over the block's
    passes). Afterwards every layer has its own mode and momentum back."""
    saved = [(m, m.training, m.momentum) for _, m in batchnorm_layers(model)]
    try:
        for m, _, _ in saved:
            m.train()
            if cumulative:
                m.momentum = None
        yield model
    finally:
        for m, training, momentum in saved:
            m.training, m.momentum = training, momentum
