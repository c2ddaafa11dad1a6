"""The registry of training methods: ``methods()`` names them, ``get(name)`` describes one and ``train(name, ...)``
trains any of them on the engine's loop.

    import metaadv as ma
    ma.methods()   # ['erm', 'pgd_at', ..., 'meta', 'meta_fo', 'meta_so']
    result = ma.train("pgd_at", model, train, ["pgd_linf(eps=0.3, steps=10)"], loop=ma.LoopConfig(epochs=3))
    result = ma.train("meta_so", model, train, ["fgsm(eps=0.3)", "pgd_l2(eps=2.0)"], support_size=16, query_size=16,
                      loop=ma.LoopConfig(batch_size=64))

Each baseline is one file here defining its ``BASELINE`` (its loss, attack check and settings; the shared
step is ``adversarial.py``); ``meta.py`` holds the meta methods. This package is ``metaadv.training_methods``
because ``metaadv.methods`` is the function ``methods()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..attacks import Attack
from ..config import LoopConfig
from ..engine import TrainResult
from ..engine.resume import Checkpointing
from ..tasks import AttackDistribution
from . import avg, erm, fast_at, max_, meta, msd, pgd_at, ramp, sat, trades
from .adversarial import Baseline
from .method import Method, TrainFn

__all__ = ["BASELINES", "Baseline", "Method", "TrainFn", "get", "methods", "train"]

# Every baseline, one line each (its file defines it); a new baseline is a new file and its line here.
BASELINES: tuple[Baseline, ...] = (
    erm.BASELINE,
    pgd_at.BASELINE,
    fast_at.BASELINE,
    trades.BASELINE,
    avg.BASELINE,
    max_.BASELINE,
    msd.BASELINE,
    sat.BASELINE,
    ramp.BASELINE,
)
_REGISTRY: Mapping[str, Method] = {m.name: m for m in (*(b.method for b in BASELINES), *meta.METHODS)}


def methods() -> list[str]:
    """The names of every registered training method: the baselines, then the meta methods."""
    return list(_REGISTRY)


def get(name: str) -> Method:
    """The registered method ``name``; ValueError naming the methods there are."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {methods()}, got {name!r}")
    return _REGISTRY[name]


def train(
    method: str,
    model: nn.Module,
    train_data: Dataset | tuple[Tensor, Tensor],
    attacks: Sequence[str | Attack] | AttackDistribution = (),
    *,
    loop: LoopConfig | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    keep_last: int = 3,
    resume: bool | str | Path = False,
    tensorboard: str | Path | None = None,
    **settings: Any,
) -> TrainResult:
    """Train ``model`` in place with ``method`` (one of :func:`methods`); returns ``TrainResult`` (the model
    in eval mode, one history record per step, the method's ``artifacts``).

    Args:
        method: a registered name; ``get(method).summary`` says what it does and ``get(method).attacks``
            how many attacks it takes.
        train_data: a Dataset of ``(x (C, H, W) in [0, 1], y)`` or an ``(x, y)`` tuple of tensors.
        attacks: attack specs (strings, dicts or ``Attack``); the meta methods also take an
            ``AttackDistribution`` (specs become a uniform one seeded with ``loop.seed``).
        loop: epochs or steps, batch size, optimizer, lr, weight decay, seed, device, logging, bad-step limit
            (default ``LoopConfig()``; for the meta methods its batch is one meta-batch,
            ``tasks_per_batch * (support_size + query_size)`` examples, which a given loop must match).
        checkpoint_dir, checkpoint_every, keep_last, resume: checkpoints for an exact resume (as in
            ``meta_train``); a step with a non-finite loss or gradient is skipped.
        tensorboard: a TensorBoard log directory (``None``: off) for the logged steps' loss, gradient norm,
            bad steps, learning rates and the method's own values (per task for the meta methods) and the
            config; a resume continues the same curves (``engine/tensorboard.py``). Needs ``pip install tensorboard``.
        settings: the method's own settings, ``get(method).settings`` (name -> default): ``clean_weight``,
            TRADES's ``beta``, RAMP's ``ramp_lambda`` / ``ramp_beta``; for the meta methods the ``MetaConfig``
            fields that are not the loop's.

    Raises:
        ValueError: an unknown method, a setting it does not take, attacks it cannot train on, or a loop
            whose batch is not one meta-batch of a meta method.
    """
    entry = get(method)
    unknown = sorted(set(settings) - set(entry.settings))
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not apply to method {method!r}; "
            f"its settings: {sorted(entry.settings)}"
        )
    if loop is None:
        loop = meta.default_loop(settings) if entry.meta else LoopConfig()
    if not isinstance(loop, LoopConfig):
        raise TypeError(f"loop must be a LoopConfig, got {type(loop).__name__}")
    checkpointing = Checkpointing(checkpoint_dir, checkpoint_every, keep_last, resume)
    return entry.train(model, train_data, attacks, loop, settings, progress=progress, checkpointing=checkpointing,
                       tensorboard=tensorboard)  # fmt: skip
