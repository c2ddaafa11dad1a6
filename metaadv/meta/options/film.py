"""Task encoding with FiLM conditioning (``MetaConfig.task_encoding``): the model sees a code of its task.

After each BatchNorm layer l of the base model the features h (B, C_l, ...) become

    h' = h * (1 + gamma_l) + beta_l,   (gamma_l, beta_l) = W_l z + b_l   (each (C_l,), broadcast over B and space)

with z (dim,) the task code and W_l, b_l a Linear layer per BatchNorm layer, both initialized to zero (a fresh
wrapper computes exactly the base model's function). The code z comes from

    "type":     z = E[i] for attack type i (E (n_types, dim) a learned embedding); an unknown type: z = 0
    "support":  z = mean_s enc(x_adv_s - x_s) over the S support examples (enc: conv3x3(C->16)-ReLU-
                conv3x3(16->16)-ReLU-global average pool-Linear(16->dim), reading the raw perturbation,
                so its size (eps) is part of what it sees)

and z = 0 means "no information" (the wrapper's ``task_code`` buffer, used when no code is passed: zero-shot
evaluation). The code is a buffer, not an argument: ``functional_call(wrapper, {**params, **with_code(buffers,
z)}, x)`` conditions on z, and z keeps its graph to E or the encoder, so the meta-gradient trains them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...functional import Params, clone_buffers
from ...tasks import AttackTask
from ...validation import check_positive
from ..sets import TaskSets
from .base import InnerLoop, MetaOption, OptionSetup, TaskBuffers

__all__ = ["ENCODINGS", "FiLM", "TaskEncoding", "code_name", "encoding_of", "task_code", "with_code"]

ENCODINGS = ("type", "support")  # where the task code comes from
CODE = "task_code"  # the wrapper's buffer holding the code the forward pass conditions on
HIDDEN = 16  # channels of the support encoder's convolutions


class FiLM(nn.Module):
    """Wrap ``model`` with feature-wise affine modulation by a task code after each of its BatchNorm layers.

    Args:
        model: the base classifier, images -> logits (B, K); it must have at least one BatchNorm layer, whose
            output channels (dimension 1) are modulated.
        n_types: the number of known attack types; type indices are 0..n_types-1, and ``n_types``
            (``self.unknown_type``) codes a type never seen in training (code 0).
        dim: size of the task code.
        encoding: ``"type"`` (a learned embedding per type, ``embedding`` (n_types, dim), initialized
            N(0, 0.1^2)) or ``"support"`` (an encoder of the support set's perturbations, ``encoder``).
        in_channels: image channels read by the support encoder (default: those of the model's first Conv2d).

    Parameters ``embedding`` or ``encoder.*``, then ``films.l.weight`` (2 C_l, dim) and ``films.l.bias``
    (2 C_l,) (gamma then beta) are registered before ``model``, so the base model's classifier stays the
    ``"head"`` of ``inner.inner_parameter_names``; the base model's tensors keep their names under ``model.``.
    The modulation is applied by forward hooks that live only while the wrapper's forward runs and read the
    code and the Linear layers by attribute, so ``functional_call`` uses the tensors it is given and the base
    model called on its own stays plain. The logits are multiplied by an exact 1 that holds the code's own
    parameters (embedding, encoder) in the graph with a zero gradient, so ``adapt`` of all parameters runs.
    """

    def __init__(
        self, model: nn.Module, n_types: int, dim: int = 8, encoding: str = "type", in_channels: int | None = None
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_positive(n_types, "n_types", integer=True)
        check_positive(dim, "dim", integer=True)
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            raise ValueError(f"FiLM modulates the outputs of BatchNorm layers, but {type(model).__name__} has none")
        like = next(model.parameters(), torch.empty(0))
        kind = {"dtype": like.dtype, "device": like.device}
        # Registered before the model: named_modules() lists the base model's head last.
        if encoding == "type":
            self.embedding = nn.Parameter(0.1 * torch.randn(n_types, dim, **kind))
        else:
            channels = in_channels if in_channels is not None else _image_channels(model)
            check_positive(channels, "in_channels", integer=True)
            self.encoder = nn.Sequential(
                nn.Conv2d(channels, HIDDEN, 3, padding=1), nn.ReLU(), nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1),
                nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(HIDDEN, dim),
            ).to(**kind)  # fmt: skip
        self.films = nn.ModuleList(nn.Linear(dim, 2 * m.num_features, **kind) for m in norms)
        with torch.no_grad():
            for film in self.films:
                film.weight.zero_()
                film.bias.zero_()
        self.register_buffer(CODE, torch.zeros(dim, **kind))
        self.model = model
        self.n_types, self.dim, self.encoding = int(n_types), int(dim), encoding
        self._norms = norms  # a plain list, not submodules: the layers are registered once, under ``model``

    @property
    def unknown_type(self) -> int:
        """The type index of an attack type unseen in training: its code is 0."""
        return self.n_types

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K) of the base model on ``x`` with its BatchNorm outputs modulated by ``self.task_code``."""
        with contextlib.ExitStack() as hooks:
            for i, norm in enumerate(self._norms):
                hooks.callback(norm.register_forward_hook(functools.partial(self._modulate, i)).remove)
            logits = self.model(x)
        own = [self.embedding] if self.encoding == "type" else list(self.encoder.parameters())
        return logits * (1 + 0 * sum(p.sum() for p in own))  # bit for bit the logits

    def _modulate(self, index: int, module: nn.Module, inputs: tuple[Tensor, ...], h: Tensor) -> Tensor:
        """The features h (B, C, ...) of BatchNorm layer ``index`` as h * (1 + gamma) + beta (module docstring)."""
        gamma, beta = self.films[index](getattr(self, CODE)).view(2, 1, -1, *([1] * (h.dim() - 2)))  # (1, C, 1, ...)
        return h * (1 + gamma) + beta


def _image_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"FiLM(encoding='support') found no Conv2d in {type(model).__name__}: pass in_channels")
    return conv.in_channels


def _find(model: nn.Module) -> tuple[str, FiLM] | None:
    """The outermost FiLM in ``model`` (itself or a submodule, e.g. inside ``MetaDropout``) and its name prefix."""
    for name, m in model.named_modules():
        if isinstance(m, FiLM):
            return (f"{name}." if name else ""), m
    return None


def encoding_of(model: nn.Module) -> str:
    """``"type"`` or ``"support"`` for a model holding a FiLM wrapper (``FiLM.encoding``), else ``"none"``."""
    found = _find(model)
    return "none" if found is None else found[1].encoding


def task_code(
    model: nn.Module,
    params: Mapping[str, Tensor],
    *,
    type_index: int | None = None,
    support_adv: Tensor | None = None,
    support_clean: Tensor | None = None,
) -> Tensor:
    """The task code z (dim,) of a FiLM model, computed from ``params`` (so it carries their graph).

    Args:
        model: a ``FiLM`` or a module holding one (its parameters named as in ``params``).
        params: the model's parameters by name (e.g. the meta-parameters of ``state(model)``).
        type_index: for ``encoding="type"``: the attack type, 0..n_types-1 -> ``embedding[type_index]``;
            ``n_types`` (``FiLM.unknown_type``) or None -> zeros.
        support_adv, support_clean: for ``encoding="support"``: the adversarial support examples and their
            clean originals (S, C, H, W) -> mean over S of ``encoder(support_adv - support_clean)``; both None
            -> zeros.
    """
    found = _find(model)
    if found is None:
        raise TypeError(f"task_code needs a FiLM model (metaadv.film.FiLM), got {type(model).__name__} without one")
    prefix, film = found
    support = support_adv is not None or support_clean is not None
    if film.encoding == "type":
        if support:
            raise ValueError("a FiLM with encoding='type' reads type_index, not support_adv / support_clean")
        emb = params[prefix + "embedding"]
        if type_index is not None and (isinstance(type_index, bool) or not isinstance(type_index, int)
                                       or not 0 <= type_index <= film.unknown_type):  # fmt: skip
            raise ValueError(f"type_index must be in [0, {film.n_types}] ({film.n_types}: unknown), got {type_index!r}")
        known = type_index is not None and type_index < film.n_types
        return emb[type_index] if known else emb.new_zeros(film.dim)
    if type_index is not None:
        raise ValueError("a FiLM with encoding='support' reads support_adv and support_clean, not type_index")
    enc = {k[len(prefix + "encoder.") :]: v for k, v in params.items() if k.startswith(prefix + "encoder.")}
    if not support:
        return enc["0.weight"].new_zeros(film.dim)
    if not isinstance(support_adv, Tensor) or not isinstance(support_clean, Tensor):
        raise ValueError("support_adv and support_clean must both be given, as tensors (S, C, H, W)")
    if support_adv.shape != support_clean.shape or support_adv.dim() != 4 or len(support_adv) == 0:
        raise ValueError(
            f"support_adv and support_clean must share one shape (S, C, H, W) with S >= 1, got "
            f"{tuple(support_adv.shape)} and {tuple(support_clean.shape)}"
        )
    return functional_call(film.encoder, enc, (support_adv - support_clean,)).mean(0)


def code_name(buffers: Mapping[str, Tensor]) -> str:
    """The name of the task code among a FiLM model's buffers (``task_code`` or ``<prefix>.task_code``)."""
    keys = [k for k in buffers if k == CODE or k.endswith("." + CODE)]
    if len(keys) != 1:
        raise ValueError(f"buffers must hold one FiLM task code ('{CODE}' or '<prefix>.{CODE}'), found {keys}")
    return keys[0]


def with_code(buffers: Mapping[str, Tensor], code: Tensor | Sequence[Tensor]) -> Params:
    """A shallow copy of ``buffers`` (a FiLM model's) whose task code is ``code`` (dim,), or a list of one code per
    task (the meta-step's per-task buffers, ``InnerLoop.per_task``).

    The other tensors are the same objects, so BatchNorm running statistics updated in a forward pass
    with the copy land in ``buffers``.
    """
    key = code_name(buffers)
    shape = buffers[key].shape
    codes = [code] if isinstance(code, Tensor) else list(code)
    if not codes or any(not isinstance(c, Tensor) or c.shape != shape for c in codes):
        raise ValueError(f"code must be a tensor of shape {tuple(shape)} or a list of them, got {code!r}")
    return {**buffers, key: code if isinstance(code, Tensor) else codes}


class TaskEncoding(MetaOption):
    """``MetaConfig.task_encoding``: the model is wrapped in ``FiLM`` (inside ``MetaDropout`` when
    both are on), and each task's inner loop and query loss run at its task code: ``"type"``, its type's
    embedding (its attacks target the model at that code too); ``"support"``, inferred from its support set's
    perturbations (attacks target the unknown code 0). The code keeps its graph to the embedding or encoder in
    the inner loop and the query pass; an attack against the adapted copy sees it detached. Other options'
    forward passes (task attention's statistics, per-type BN updates) run at the model's own (zero) code."""

    field, name = "task_encoding", "task_encoding"

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.task_encoding != "none"

    @classmethod
    def wrap(cls, model: nn.Module, config: Any, n_types: int) -> nn.Module:
        return FiLM(model, n_types, config.encoding_dim, config.task_encoding)

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> TaskEncoding:
        return cls(config.task_encoding)

    def attack_buffers(
        self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask]
    ) -> TaskBuffers | None:
        if self.encoding != "type":
            return None
        codes = [task_code(model, params, type_index=t.type_index).detach() for t in tasks]
        return TaskBuffers(with_code(buffers, codes), frozenset({code_name(buffers)}))

    def task_loop(
        self, model: nn.Module, params: Params, tasks: Sequence[AttackTask], sets: Sequence[TaskSets], loop: InnerLoop
    ) -> InnerLoop:
        if self.encoding == "type":
            codes = [task_code(model, params, type_index=t.type_index) for t in tasks]
        else:
            codes = [task_code(model, params, support_adv=s.support, support_clean=s.support_clean) for s in sets]
        steps = loop.settings.get("buffers")  # per-step statistics, or scratch copies of the model's
        coded = (
            [with_code(b, codes) for b in steps] if steps is not None else with_code(clone_buffers(loop.buffers), codes)
        )
        return loop.replace(
            settings={**loop.settings, "buffers": coded},
            query_buffers=with_code(loop.query_buffers, codes),
            attack_buffers=with_code(loop.attack_buffers, [c.detach() for c in codes]),
            per_task=loop.per_task | {code_name(loop.buffers)},
        )
