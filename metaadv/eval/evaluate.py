"""``evaluate``: clean, per-attack and union accuracy of a model, zero-shot and after few-shot adaptation.

Every attack runs white-box against the model being reported, in eval mode, on [0, 1] images. With
``adapt_shots > 0`` each attack also crafts a small support set from examples disjoint from the
evaluation examples, the model is adapted to it (SGD fine-tuning and/or test-time BatchNorm statistics),
and the attack is re-run against the *adapted* model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data import to_tensors
from ..functional import batchnorm_layers, eval_mode, model_fn, state
from ..meta.options import artifact_eval_options
from ..meta.options.step_bn import StepBatchNorm
from ..meta.options.task_bn import TaskBatchNorm
from ..types import Params
from ..validation import check_images, check_labels, check_logits, check_positive
from .accuracy import attack_correct, correct, frac, percent, resolve_attacks
from .adaptation import ADAPT_METHODS, adapted_results, check_inner_options
from .report import RobustnessReport

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    attacks: Any,
    *,
    adapt_shots: int = 0,
    adapt_steps: int = 10,
    adapt_lr: float | Mapping[str, Tensor] = 0.01,
    adapt_params: str = "all",
    adapt_proximal: float = 0.0,
    adapt_methods: Sequence[str] = ("sgd",),
    bn_momentum: float | None = None,
    task_bn: TaskBatchNorm | None = None,
    step_bn: StepBatchNorm | None = None,
    artifacts: Mapping[str, Any] | None = None,
    n_examples: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> RobustnessReport:
    """Evaluate ``model`` against ``attacks``: clean, per-attack and union accuracy, optionally adapted.

    Args:
        model: a classifier mapping [0, 1] images to logits. It is evaluated in eval mode; its train/eval
            flags, parameters and buffers are as before when this returns.
        data: a Dataset or an ``(x, y)`` tuple of tensors.
        attacks: one attack or a sequence of them: spec strings (``"pgd_linf(eps=0.3, steps=10)"``,
            ``"torchattacks:PGD(eps=0.3)"``), dicts or ``Attack`` objects (see ``metaadv.attacks.make``).
        adapt_shots: support examples per attack for few-shot adaptation (0: zero-shot only). They are
            drawn from examples disjoint from the evaluation examples.
        adapt_steps, adapt_lr: SGD steps and learning rate of the ``"sgd"`` adaptation; ``adapt_lr`` may also
            be a tensor per adapted parameter, name -> tensor shaped like it (Meta-SGD's ``TrainResult.inner_lr``).
        adapt_params, adapt_proximal: the ``"sgd"`` adaptation's ``inner_params`` (``"all"`` or ``"head"``:
            ANIL) and ``proximal`` weight (>= 0), as in ``adapt``: with ``adapt_lr``, a meta-trained model can
            be adapted with its own inner loop (``MetaConfig`` ``inner_params``, ``proximal``, ``inner_lr``).
        adapt_methods: any of ``"sgd"`` (fine-tune on the adversarial support set, first order, eval mode),
            ``"bn"`` (re-estimate every BatchNorm layer's statistics from the adversarial support set,
            no gradient step) and ``"task_bn"`` (normalize with the BatchNorm statistics of the training
            attack type nearest to the support set's, from ``task_bn``; no gradient step).
        bn_momentum: ``None`` uses the support statistics alone; ``m`` in (0, 1] mixes
            ``(1 - m) * training statistics + m * support statistics``.
        task_bn: the per-attack-type statistics of a run with ``MetaConfig(task_bn=True)``
            (``TrainResult.task_bn``); needed by ``"task_bn"``. The chosen type per attack is in
            ``RobustnessReport.meta["task_bn_types"]``.
        artifacts: what a meta-trained run's options learned for adaptation (``TrainResult.artifacts``): they
            supply ``adapt_lr`` (Meta-SGD's step sizes), ``task_bn`` and ``step_bn``, which are then not given
            directly.
        step_bn: the per-step statistics of a run with ``MetaConfig(per_step_bn=True)`` (``TrainResult.step_bn``,
            K inner steps). The ``"sgd"`` adaptation's step k then normalizes with set min(k, K) (set 0: the
            model's own) and the adapted model with set K, measured at the adapted parameters in training;
            zero-shot and the other methods are unchanged.
        n_examples: evaluate on the first ``n_examples`` of a seeded permutation (None: all examples not
            reserved for the support pool). The evaluation examples do not depend on ``adapt_shots``.
        batch_size: minibatch size for attacks and forward passes.
        seed: seeds the permutation and every attack run (the caller's RNG state is left untouched).
        device: where to evaluate (default: the device of the model's parameters). The model itself is
            not moved; a functional copy of its tensors is used.
        progress: show a tqdm progress bar over attack runs.

    Returns:
        A frozen :class:`RobustnessReport`.
    """
    start = time.perf_counter()
    opts = {"adapt_steps": adapt_steps, "adapt_params": adapt_params, "adapt_proximal": adapt_proximal,
            "bn_momentum": bn_momentum}  # fmt: skip
    atks = resolve_attacks(attacks)
    methods = _check_options(adapt_shots, adapt_steps, adapt_lr, adapt_methods, bn_momentum, n_examples, batch_size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if artifacts:
        given = {
            "adapt_lr": adapt_lr if isinstance(adapt_lr, Mapping) else None,
            "task_bn": task_bn,
            "step_bn": step_bn,
        }
        found = artifact_eval_options(artifacts)
        twice = sorted(k for k in found if given.get(k) is not None)
        if twice:
            raise ValueError(f"{twice} given both directly and through artifacts: pass one of them")
        adapt_lr, task_bn, step_bn = found.get("adapt_lr", adapt_lr), found.get("task_bn", task_bn), found.get(
            "step_bn", step_bn)  # fmt: skip
    if adapt_shots > 0:
        _check_methods(model, methods, task_bn)
    check_inner_options(model, adapt_lr, adapt_params, adapt_proximal, step_bn)
    x_all, y_all = to_tensors(data)
    check_images(x_all, "data images")
    eval_idx, support_idx = _split(len(x_all), n_examples, adapt_shots, seed)

    dev, params, buffers, lr, step_sets = _functional_copy(model, device, adapt_lr, step_bn, x_all.dtype)
    dtype = _dtype(params, x_all.dtype)
    x, y = x_all[eval_idx].to(dev, dtype), y_all[eval_idx].to(dev)  # (n, C, H, W), (n,)
    x_s, y_s = x_all[support_idx].to(dev, dtype), y_all[support_idx].to(dev)  # (adapt_shots, C, H, W)

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with eval_mode(model), torch.random.fork_rng(devices=cuda):  # attacks are seeded; the caller's RNG is left alone
        fn = model_fn(model, params, buffers)
        with torch.no_grad():
            n_out = check_logits(fn(x[:1]), 1).shape[1]
        check_labels(y_all, len(y_all), n_out, "data labels")
        runs = len(atks) * (1 + (len(methods) if adapt_shots else 0))
        with tqdm(total=runs, desc="evaluate", disable=not progress) as bar:
            clean = correct(fn, x, y, batch_size)
            masks = {}
            for spec, atk in atks.items():
                masks[spec] = attack_correct(atk, spec, fn, x, y, batch_size, seed)
                logger.info("%s: %.1f%% (clean %.1f%%)", spec, percent(masks[spec]), percent(clean))
                bar.update()
            adapted, adapted_clean, survive, chosen = {}, {}, {}, {}
            if adapt_shots:
                how = {"steps": adapt_steps, "lr": lr, "inner_params": adapt_params, "proximal": adapt_proximal,
                       "step_sets": step_sets, "momentum": bn_momentum, "batch_size": batch_size, "task_bn": task_bn,
                       "chosen": chosen}  # fmt: skip
                adapted, adapted_clean, survive = adapted_results(
                    model, params, buffers, atks, methods, (x, y), (x_s, y_s), seed, how, bar
                )

    union = clean.clone()
    for mask in masks.values():
        union &= mask
    return RobustnessReport(
        clean_acc=frac(clean),
        per_attack={spec: frac(m) for spec, m in masks.items()},
        union_acc=frac(union),
        n_examples=len(eval_idx),
        attacks=tuple(atks),
        adapt_shots=adapt_shots,
        adapted=adapted,
        adapted_union={m: frac(v) for m, v in survive.items()},
        adapted_clean=adapted_clean,
        seconds=time.perf_counter() - start,
        meta={
            "seed": seed,
            "torch": torch.__version__,
            "device": str(dev),
            "batch_size": batch_size,
            "adapt_methods": list(methods) if adapt_shots else [],
            **{k: v for k, v in opts.items() if k in ("adapt_steps", "adapt_params", "adapt_proximal", "bn_momentum")},
            "adapt_lr": "learned" if isinstance(adapt_lr, Mapping) else adapt_lr,  # learned: a tensor per parameter
            "step_bn": step_bn is not None,
            **({"task_bn_types": chosen} if chosen else {}),
        },
    )


def _dtype(params: Params, default: torch.dtype) -> torch.dtype:
    return next((p.dtype for p in params.values() if p.is_floating_point()), default)


def _functional_copy(
    model: nn.Module, device: str | torch.device | None, adapt_lr: Any, step_bn: Any, default: torch.dtype
) -> tuple[torch.device, Params, Params, Any, list[Params]]:
    """The device, the model's parameters (detached) and buffers on ``device`` (default: where they are), the
    learned step sizes (if any) there, and the BatchNorm statistics per inner step (``[buffers]`` without
    ``step_bn``)."""
    params, buffers = state(model)
    dev = torch.device(device) if device is not None else _default_device(params, buffers)
    dtype = _dtype(params, default)
    params = {k: v.detach().to(dev) for k, v in params.items()}  # a functional copy: the model never moves
    buffers = {k: v.to(dev) for k, v in buffers.items()}
    lr = {k: v.detach().to(dev, dtype) for k, v in adapt_lr.items()} if isinstance(adapt_lr, Mapping) else adapt_lr
    step_sets = [buffers, *({k: v.to(dev) for k, v in s.items()} for s in step_bn.stats)] if step_bn else [buffers]
    return dev, params, buffers, lr, step_sets


def _check_methods(model: nn.Module, methods: Sequence[str], task_bn: object) -> None:
    if "task_bn" in methods and not isinstance(task_bn, TaskBatchNorm):
        raise ValueError(
            "adapt method 'task_bn' needs the per-type BatchNorm statistics of a run with MetaConfig(task_bn=True): "
            f"pass task_bn=result.task_bn, got {type(task_bn).__name__}"
        )
    if {"bn", "task_bn"} & set(methods) and not batchnorm_layers(model):
        raise ValueError(
            "adapt method 'bn' re-estimates BatchNorm statistics, but the model has no BatchNorm layer "
            f"tracking running statistics; use adapt_methods=('sgd',) for {type(model).__name__}"
        )


def _check_options(
    shots: object,
    steps: object,
    lr: object,
    methods: object,
    bn_momentum: object,
    n_examples: object,
    batch_size: object,
) -> tuple[str, ...]:
    check_positive(shots, "adapt_shots", allow_zero=True, integer=True)
    check_positive(steps, "adapt_steps", allow_zero=True, integer=True)
    if not isinstance(lr, Mapping):  # a mapping (learned step sizes) is checked by check_inner_options
        check_positive(lr, "adapt_lr")
    check_positive(batch_size, "batch_size", integer=True)
    if n_examples is not None:
        check_positive(n_examples, "n_examples", integer=True)
    if bn_momentum is not None:
        check_positive(bn_momentum, "bn_momentum")
        if bn_momentum > 1:  # type: ignore[operator]
            raise ValueError(f"bn_momentum must be None or in (0, 1], got {bn_momentum!r}")
    methods = (methods,) if isinstance(methods, str) else tuple(methods)  # type: ignore[arg-type]
    bad = [m for m in methods if m not in ADAPT_METHODS]
    if bad or not methods:
        raise ValueError(f"unknown adapt_methods {bad or list(methods)}; allowed: {list(ADAPT_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"adapt_methods lists a method twice: {list(methods)}")
    return methods


def _split(n: int, n_examples: int | None, shots: int, seed: int) -> tuple[Tensor, Tensor]:
    """Evaluation indices (a seeded permutation's head) and a disjoint support pool (its tail)."""
    n_eval = n - shots if n_examples is None else n_examples
    if n_eval <= 0 or n_eval + shots > n:
        raise ValueError(
            f"the data has {n} examples: too few for {n_eval if n_examples else 'at least 1'} evaluation "
            f"examples plus adapt_shots={shots} disjoint support examples"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_eval], perm[n - shots :]


def _default_device(params: Params, buffers: Params) -> torch.device:
    for t in (*params.values(), *buffers.values()):
        return t.device
    return torch.device("cpu")
