"""The baselines' flat entry points: ``adversarial_train``, ``adversarial_loss``, ``training_attacks`` and
``METHODS``, delegating to the registry (``metaadv.training_methods``: one file per method, the shared step
in ``adversarial.py``, RAMP's notes in ``ramp.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn
from torch.utils.data import Dataset

from .attacks import Attack
from .config import LoopConfig
from .engine import TrainResult
from .training_methods import BASELINES, Baseline, train
from .training_methods.adversarial import check_settings, resolve_attacks
from .training_methods.ramp import gradient_projection, ramp_loss

__all__ = ["METHODS", "adversarial_loss", "adversarial_train", "gradient_projection", "ramp_loss", "training_attacks"]

METHODS = tuple(b.name for b in BASELINES)
_BY_NAME = {b.name: b for b in BASELINES}


def _baseline(method: str) -> Baseline:
    if method not in _BY_NAME:
        raise ValueError(f"method must be one of {METHODS}, got {method!r} (meta methods: metaadv.train)")
    return _BY_NAME[method]


def _settings(method: str, clean_weight: float, **given: float) -> dict[str, float]:
    """The settings ``method`` takes; ``clean_weight`` > 0 also when it does not (the registry rejects it)."""
    takes = _baseline(method).settings
    settings = {k: v for k, v in given.items() if k in takes}
    return settings | ({"clean_weight": clean_weight} if "clean_weight" in takes or clean_weight != 0 else {})


def training_attacks(method: str, attacks: Sequence[str | Attack]) -> list[Attack]:
    """Check ``attacks`` for baseline ``method`` and return the attacks it crafts; raises ValueError naming
    the problem. ``"msd"`` turns Lp attacks into the one ``msd`` attack on their union (``msd.py``)."""
    return resolve_attacks(_baseline(method), attacks)


def adversarial_loss(
    model: nn.Module,
    attacks: Sequence[str | Attack],
    x: Tensor,
    y: Tensor,
    method: str,
    *,
    beta: float = 6.0,
    ramp_lambda: float = 5.0,
) -> Tensor:
    """Per-example loss (B,) of ``method`` on the batch; attacks are crafted against the current model.

    ``attacks`` as :func:`adversarial_train` takes them (checked by :func:`training_attacks`);
    ``beta`` is TRADES's weight of the KL term, ``ramp_lambda`` RAMP's (other methods ignore them).
    RAMP's gradient projection acts on the update, not the loss: see :func:`adversarial_train`.
    """
    baseline = _baseline(method)
    given = {"beta": beta, "ramp_lambda": ramp_lambda}
    settings = check_settings(baseline, {k: v for k, v in given.items() if k in baseline.settings})
    return baseline.loss(model, resolve_attacks(baseline, attacks), x, y, settings)


def adversarial_train(
    model: nn.Module,
    train_data: Dataset | tuple[Tensor, Tensor],
    attacks: Sequence[str | Attack] = (),
    *,
    method: str = "pgd_at",
    clean_weight: float = 0.0,
    beta: float = 6.0,
    ramp_lambda: float = 5.0,
    ramp_beta: float = 0.5,
    epochs: int = 3,
    steps: int | None = None,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    keep_last: int = 3,
    resume: bool | str | Path = False,
    max_bad_steps: int | None = 5,
    tensorboard: str | Path | None = None,
) -> TrainResult:
    """Train ``model`` in place with a baseline method; returns ``TrainResult`` (history: ``loss``,
    ``grad_norm``, ``skipped``, ``bad_steps`` per step). The same as ``metaadv.train(method, ...)`` with the
    loop's fields as keywords.

    ``method`` and its ``attacks``:
        ``"erm"``: none. ``"pgd_at"``: exactly one. ``"fast_at"``: one ``fgsm_rs`` (Wong et al. 2020).
        ``"avg"`` / ``"max"``: one or more, of any norms (Tramer & Boneh 2019).
        ``"msd"`` (Maini et al. 2020): one ``"msd(eps_linf=0.3, eps_l2=2.0, eps_l1=10.0, steps=...)"``,
        or Lp attacks whose union it attacks: per norm the largest eps, the largest ``steps``, msd's
        default step sizes (e.g. ``["pgd_linf(eps=0.3, steps=10)", "pgd_l2(eps=2.0, steps=10)"]``).
        ``"trades"`` (Zhang et al. 2019): one Lp attack giving the ball, ``steps`` and ``alpha`` of
        TRADES's KL ascent (e.g. ``"pgd_linf(eps=0.3, steps=10)"``); crafted in eval mode.
        ``"sat"`` (Croce & Hein 2022): two or more; each batch trains on one, drawn uniformly (E-AT:
        ``["pgd_linf(eps=0.3, steps=10)", "pgd_l1(eps=10.0, steps=10)"]``).
        ``"ramp"`` (Jiang & Singh 2024): two or more different attacks, of any kind; each batch pairs its
        two strongest (``training_methods/ramp.py``), e.g.
        ``["pgd_linf(eps=0.3, steps=10)", "pgd_l1(eps=10.0, steps=10)"]``.
    ``clean_weight`` w mixes the loss as ``(1-w) * L_adv + w * L_clean`` (not for ``"erm"`` and ``"trades"``,
    whose loss has its clean term). ``beta``: TRADES's weight of the KL term (default 6.0, the paper's 1/lambda).
    ``ramp_lambda`` (>= 0, default 5.0): RAMP's weight of the logit-pairing KL. ``ramp_beta`` (in [0, 1],
    default 0.5): RAMP's gradient projection weight; each step the update is
    ``(1 - ramp_beta) * g_adv + ramp_beta * max(cos, 0) * g_clean`` per parameter tensor (0: plain g_adv),
    at the cost of one clean forward/backward; the mean cosine is logged as ``gp_cos``. Methods ignore
    ``beta``, ``ramp_lambda`` and ``ramp_beta`` unless they take them; ``clean_weight`` > 0 raises
    ValueError for ``"erm"`` and ``"trades"``.

    ``checkpoint_dir``, ``checkpoint_every``, ``keep_last``, ``resume`` and ``max_bad_steps`` work as in
    ``meta_train``: exact resume after an interruption, and a step with a non-finite loss or gradient is
    skipped (``max_bad_steps`` consecutive ones raise ``NonFiniteLossError``). ``tensorboard``: a TensorBoard
    log directory for the loss, gradient norm, bad steps and learning rate (as in ``meta_train``; off by default).
    """
    settings = _settings(method, clean_weight=clean_weight, beta=beta, ramp_lambda=ramp_lambda, ramp_beta=ramp_beta)
    loop = LoopConfig(epochs=epochs, steps=steps, batch_size=batch_size, optimizer=optimizer, lr=lr,
                      weight_decay=weight_decay, seed=seed, device=device, max_bad_steps=max_bad_steps)  # fmt: skip
    return train(method, model, train_data, attacks, loop=loop, progress=progress, checkpoint_dir=checkpoint_dir,
                 checkpoint_every=checkpoint_every, keep_last=keep_last, resume=resume, tensorboard=tensorboard,
                 **settings)  # fmt: skip
