"""Few-shot adaptation at test time: each method (``ADAPT_METHODS``) adapts the model to an attack's adversarial
support set, and the attack is re-run white-box against the adapted model, in eval mode (docs/adaptation.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import INNER_PARAMS
from ..functional import batchnorm_layers, batchnorm_training, call, clone_buffers, detach, model_fn
from ..meta.inner import LearningRate, adapt, inner_parameter_names
from ..meta.options.film import encoding_of, task_code, with_code
from ..meta.options.step_bn import StepBatchNorm
from ..meta.options.task_bn import TaskBatchNorm
from ..types import ModelFn, Params
from ..validation import check_positive
from .accuracy import attack_correct, craft, frac, logits_of, percent, right
from .matched import matched_model

__all__ = [
    "ADAPT_METHODS",
    "BN_METHODS",
    "FINETUNING",
    "Plan",
    "adapted_model",
    "adapted_results",
    "check_inner_options",
    "support_bn_statistics",
]

logger = logging.getLogger(__name__)

# SGD fine-tuning; test-time BN statistics (pure, then mixed with the training statistics); BN statistics then
# fine-tuning; the nearest per-type BN statistics; the inner loop of meta-training
ADAPT_METHODS = ("sgd", "bn", "bn_mix", "bn_sgd", "task_bn", "matched")
FINETUNING = ("sgd", "bn_sgd")  # the methods that take SGD steps with a chosen (steps, lr)
BN_METHODS = ("bn", "bn_mix", "bn_sgd", "task_bn")  # the methods that re-estimate BatchNorm statistics
Plan = tuple[str, Mapping[str, Any]]  # an adaptation: its method and what it changes in the shared settings


def adapted_results(
    model: nn.Module,
    params: Params,
    buffers: Params,
    atks: Mapping[str, Callable[..., Tensor]],
    plans: Mapping[str, Plan],
    query: tuple[Tensor, Tensor],
    support: tuple[Tensor, Tensor],
    seed: int,
    opts: dict[str, Any],
    bar: tqdm,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, Tensor]]:
    """Per plan (name -> (method, changes to ``opts``, ``adapted_model``'s settings)): accuracy under each attack
    re-run against the model adapted to that attack's support set, clean accuracy of that adapted model, and
    the per-example mask of surviving every one of them. Each support set is crafted once, for every plan."""
    (x, y), (x_s, y_s) = query, support
    adapted = {name: {} for name in plans}
    adapted_clean = {name: {} for name in plans}
    survive = {name: torch.ones_like(y, dtype=torch.bool) for name in plans}
    fn = model_fn(model, params, buffers)
    for spec, atk in atks.items():
        torch.manual_seed(seed)
        x_adv_s = craft(atk, spec, fn, x_s, y_s, opts["batch_size"])  # against the unadapted model
        code = None  # a FiLM model's task code inferred from the support set's perturbations (film.py)
        if encoding_of(model) == "support":
            with torch.no_grad():
                code = task_code(model, params, support_adv=x_adv_s, support_clean=x_s)
        for name, (method, changes) in plans.items():
            how = {**opts, **changes}
            fn_a = adapted_model(method, model, params, buffers, x_adv_s, y_s, spec=spec, code=code, **how)
            logits = logits_of(fn_a, x, opts["batch_size"])
            clean_a = right(logits, y)
            if not logits.isfinite().all():  # it blew up (too large a step): no gradient to attack, 0%
                logger.warning("%s@%d %s: the adapted model's outputs are not finite (0%%)", name, len(y_s), spec)
                mask = torch.zeros_like(clean_a)
            else:
                mask = attack_correct(atk, spec, fn_a, x, y, opts["batch_size"], seed)  # white-box, adapted
            survive[name] &= clean_a & mask
            adapted[name][spec], adapted_clean[name][spec] = frac(mask), frac(clean_a)
            logger.info("%s@%d %s: %.1f%%", name, len(y_s), spec, percent(mask))
            bar.update()
    return adapted, adapted_clean, survive


def check_inner_options(model: nn.Module, lr: object, inner_params: object, proximal: object, step_bn: object) -> None:
    """The ``"sgd"`` adaptation's inner-loop options: ``adapt_params``, ``adapt_proximal``, a learned ``adapt_lr``
    (one tensor per adapted parameter, shaped like it) and ``step_bn`` (statistics for the model's buffers)."""
    if inner_params not in INNER_PARAMS:
        raise ValueError(f"adapt_params must be one of {INNER_PARAMS}, got {inner_params!r}")
    check_positive(proximal, "adapt_proximal", allow_zero=True)
    if isinstance(lr, Mapping):
        own = dict(model.named_parameters())
        names = inner_parameter_names(model, inner_params)
        if set(lr) != set(names):
            raise ValueError(f"adapt_lr must hold one tensor per adapted parameter {names} "
                             f"(adapt_params={inner_params!r}), got {sorted(lr)}")  # fmt: skip
        for k, v in lr.items():
            if not isinstance(v, Tensor) or v.shape != own[k].shape:
                raise ValueError(f"adapt_lr[{k!r}] must be a tensor of shape {tuple(own[k].shape)}, got {v!r}")
    if step_bn is not None:
        if not isinstance(step_bn, StepBatchNorm):
            raise TypeError(
                f"step_bn must be a StepBatchNorm (TrainResult.step_bn) or None, got {type(step_bn).__name__}"
            )
        own_buffers = {k for k, _ in model.named_buffers()}
        if any(set(s) != own_buffers for s in step_bn.stats):
            raise ValueError(f"step_bn holds statistics for other buffers than {type(model).__name__}'s")


def adapted_model(
    method: str,
    model: nn.Module,
    params: Params,
    buffers: Params,
    x_s: Tensor,
    y_s: Tensor,
    *,
    steps: int,
    lr: LearningRate | None,
    inner_params: str,
    proximal: float,
    step_sets: list[Params],
    momentum: float | None,
    batch_size: int,
    task_bn: TaskBatchNorm | None,
    chosen: dict[str, str],
    spec: str,
    code: Tensor | None = None,
) -> ModelFn:
    """The eval-mode model after adapting to the adversarial support set ``(x_s, y_s)`` with ``method``
    (``"task_bn"`` records the type it picked for ``spec`` in ``chosen``). ``step_sets``: BatchNorm statistics
    per inner step (``[buffers]`` without ``step_bn``); SGD step k normalizes with set min(k, K), the result
    with set K (``"matched"``: BatchNorm in training mode during the steps, see ``matched.py``). ``momentum``:
    ``"bn"``'s and ``"bn_mix"``'s mixing weight (None: the support statistics alone; ``"bn_sgd"`` uses them
    alone). ``code``: a FiLM model's task code (dim,), used in every forward pass (None: the model's own)."""
    if code is not None:
        buffers, step_sets = with_code(buffers, code), [with_code(b, code) for b in step_sets]
    loop = {"steps": steps, "lr": lr, "inner_params": inner_params, "proximal": proximal}
    if method == "matched":
        return matched_model(model, params, step_sets, x_s, y_s, **loop)  # type: ignore[arg-type]
    if method == "sgd":
        return _finetuned(model, params, step_sets, x_s, y_s, **loop)
    pure = method in ("task_bn", "bn_sgd")
    support = support_bn_statistics(model, params, buffers, x_s, None if pure else momentum, batch_size)
    if method in ("bn", "bn_mix"):
        return model_fn(model, params, support)
    if method == "bn_sgd":
        return _finetuned(model, params, [support], x_s, y_s, **loop)
    k = task_bn.nearest(model, support)  # type: ignore[union-attr]
    chosen[spec] = task_bn.names[k]  # type: ignore[union-attr]
    typed = {n: v.to(support[n].device) for n, v in task_bn.buffers(k).items()}  # type: ignore[union-attr]
    return model_fn(model, params, typed if code is None else with_code(typed, code))


def _finetuned(
    model: nn.Module, params: Params, step_sets: list[Params], x_s: Tensor, y_s: Tensor, *, steps: int,
    lr: LearningRate | None, inner_params: str, proximal: float,
) -> ModelFn:  # fmt: skip
    """The model after ``steps`` first-order SGD steps on ``(x_s, y_s)`` in eval mode, step k normalizing with
    ``step_sets[min(k, K)]``, the result with ``step_sets[-1]``; 0 steps (``lr`` None): not moved."""
    if steps == 0:
        return model_fn(model, params, step_sets[-1])
    per_step = [clone_buffers(step_sets[min(k, len(step_sets) - 1)]) for k in range(steps)]
    theta = adapt(model, x_s, y_s, params=params, buffers=per_step, steps=steps, lr=lr, first_order=True,
                  inner_params=inner_params, proximal=proximal)  # type: ignore[arg-type]  # fmt: skip
    return model_fn(model, detach(theta), step_sets[-1])


def support_bn_statistics(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: Tensor,
    momentum: float | None = None,
    batch_size: int = 256,
) -> Params:
    """Copies of ``buffers`` with every BatchNorm layer's running statistics re-estimated on ``x``.

    A forward pass with the BatchNorm layers (only) in training mode and ``momentum=None`` (a cumulative
    average over minibatches) on fresh copies of the buffers; ``momentum=m`` then mixes
    ``(1 - m) * old + m * new``. The model's own buffers, modes and momenta are unchanged on return.
    """
    layers = batchnorm_layers(model)
    new = clone_buffers(buffers)
    for p, _ in layers:
        new[p + "running_mean"].zero_()
        new[p + "running_var"].fill_(1.0)
        if p + "num_batches_tracked" in new:
            new[p + "num_batches_tracked"].zero_()
    with batchnorm_training(model, cumulative=True), torch.no_grad():
        for xb in x.split(batch_size):
            call(model, params, new, xb)
    for p, _ in layers:
        if p + "num_batches_tracked" in new:
            new[p + "num_batches_tracked"] = buffers[p + "num_batches_tracked"].clone()
        if momentum is not None:
            for stat in ("running_mean", "running_var"):
                new[p + stat] = (1 - momentum) * buffers[p + stat] + momentum * new[p + stat]
    return new
