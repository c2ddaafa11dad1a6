"""Run Adversarial Robustness Toolbox evasion attacks against any model callable: ``"art:NAME(...)"``.

ART (IBM, https://github.com/Trusted-AI/adversarial-robustness-toolbox) is a second independent
evaluator next to torchattacks; it has what torchattacks lacks, an L1 AutoPGD:
``"art:AutoProjectedGradientDescent(norm=1, eps=10.0, eps_step=1.0)"``. It is optional
(``pip install adversarial-robustness-toolbox``, which needs no torch of its own).

The model callable is wrapped in a ``PyTorchClassifier`` with ``clip_values=(0, 1)``; ART works on
NumPy arrays, so its random starts are seeded from torch's generator (``evaluate``'s seed reaches them)
and NumPy's global state is restored afterwards. Defaults that differ from ART's: ``verbose=False`` and
``batch_size=256``; the canonical spec shows them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .external import AsModule, import_optional, signature_params
from .registry import AttackEntry, register_namespace

__all__ = ["INSTALL_HINT", "art_entry"]

INSTALL_HINT = "pip install adversarial-robustness-toolbox"
_DEFAULTS = {"verbose": False, "batch_size": 256}
_NORMS = {1: "l1", 2: "l2", "1": "l1", "2": "l2", "inf": "linf", float("inf"): "linf"}


def _norm(params: Mapping[str, Any]) -> str | None:
    return _NORMS.get(params.get("norm"))  # type: ignore[arg-type]


def _classifier(model_fn: Callable[[Tensor], Tensor], x: Tensor) -> Any:
    from art.estimators.classification import PyTorchClassifier

    with torch.no_grad():
        n_classes = model_fn(x[:1]).shape[1]
    return PyTorchClassifier(
        model=AsModule(model_fn, x), loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
        nb_classes=n_classes, clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu",
    )  # fmt: skip


def _run(cls: type, model_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
    attack = cls(_classifier(model_fn, x), **kwargs)
    state = np.random.get_state()
    np.random.seed(int(torch.randint(0, 2**31 - 1, ())))  # ART's random starts follow torch's seed
    try:
        with torch.enable_grad():
            x_adv = attack.generate(x.detach().cpu().numpy(), y=F.one_hot(y, attack.estimator.nb_classes).cpu().numpy())
    finally:
        np.random.set_state(state)
    return torch.from_numpy(x_adv).to(device=x.device, dtype=x.dtype)


@functools.cache
def art_entry(class_name: str) -> AttackEntry:
    """The registry entry for ``art:<class_name>``; ValueError if ART has no such evasion attack."""
    evasion = import_optional("art.attacks.evasion", "art", f"the Adversarial Robustness Toolbox: {INSTALL_HINT}")
    cls = getattr(evasion, class_name, None)
    params = list(inspect.signature(cls.__init__).parameters) if isinstance(cls, type) else []
    if len(params) < 2 or params[1] not in ("estimator", "classifier"):
        names = sorted(n for n in dir(evasion) if n[0].isupper() and isinstance(getattr(evasion, n), type))
        raise ValueError(f"unknown ART evasion attack {class_name!r}; available: {', '.join(names)}")
    name = f"art:{class_name}"

    def check_all(values: Mapping[str, Any]) -> None:  # build once on a dummy classifier to surface bad values
        try:
            cls(_classifier(nn.Flatten(), torch.zeros(1, 2)), **values)
        except Exception as e:
            raise ValueError(f"{name}: ART rejected {dict(values)}: {type(e).__name__}: {e}") from None

    summary = (inspect.getdoc(cls) or "").split("\n", 1)[0]
    spec_params = signature_params(cls, {k: v for k, v in _DEFAULTS.items() if k in params})
    return AttackEntry(name, functools.partial(_run, cls), spec_params, _norm, summary, check_all)


register_namespace("art", art_entry)
