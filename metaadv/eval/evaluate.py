"""``evaluate``: clean, per-attack and union accuracy of a model, zero-shot and after few-shot adaptation.

Every attack runs white-box against the model being reported, in eval mode, on [0, 1] images. With
``adapt_shots > 0`` each attack also crafts a small support set from examples disjoint from the
evaluation examples, the model is adapted to it (fine-tuning, test-time BatchNorm statistics, both, or the
inner loop it was meta-trained with: docs/adaptation.md), and the attack is re-run against the *adapted* model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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
from .adaptation import ADAPT_METHODS, BN_METHODS, FINETUNING, Plan, adapted_results, check_inner_options
from .matched import InnerLoopSpec
from .report import RobustnessReport

__all__ = ["Prepared", "evaluate", "isolated", "prepare"]

logger = logging.getLogger(__name__)

FineTune = tuple[int, float | None]  # (steps, lr) of a fine-tuning method; lr None iff steps == 0


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
    bn_mix_momentum: float = 0.1,
    finetune: Mapping[str, FineTune] | None = None,
    inner_loop: InnerLoopSpec | None = None,
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
        adapt_steps, adapt_lr: SGD steps and learning rate of ``"sgd"`` and ``"bn_sgd"``; ``adapt_lr`` may also
            be a tensor per adapted parameter, name -> tensor shaped like it (Meta-SGD's ``TrainResult.inner_lr``).
        adapt_params, adapt_proximal: their ``inner_params`` (``"all"``, ``"head"``: ANIL, or ``"bn"``: the
            BatchNorm layers' affine parameters) and ``proximal`` weight (>= 0), as in ``adapt``.
        adapt_methods: any of ``ADAPT_METHODS`` (each re-runs every attack against the model it adapts, in eval
            mode; docs/adaptation.md gives their rules): ``"sgd"`` (fine-tune on the adversarial support set, first
            order, eval mode), ``"bn"`` (re-estimate every BatchNorm layer's statistics from the adversarial support
            set, no gradient step), ``"bn_mix"`` (the same, mixed with the training statistics by
            ``bn_mix_momentum``), ``"bn_sgd"`` (``"bn"``'s pure support statistics, then fine-tuning from there),
            ``"task_bn"`` (the BatchNorm statistics of the training attack type nearest to the support set's, from
            ``task_bn``) and ``"matched"`` (the inner loop of meta-training, ``inner_loop``).
        bn_momentum: ``"bn"``'s mixing: ``None`` uses the support statistics alone; ``m`` in (0, 1] mixes
            ``(1 - m) * training statistics + m * support statistics``.
        bn_mix_momentum: ``"bn_mix"``'s ``m`` in (0, 1] (default 0.1, BatchNorm's own default momentum).
        finetune: per fine-tuning method (``"sgd"``, ``"bn_sgd"``, each one of ``adapt_methods``) its own
            ``(steps, lr)`` instead of ``adapt_steps, adapt_lr``, e.g. ``tune_finetuning``'s choice (steps 0 with
            lr None: no step). Recorded in ``RobustnessReport.meta["finetune"]``.
        inner_loop: the inner loop the model was meta-trained with (``InnerLoopSpec.from_config(meta_config,
            result.artifacts)``), needed by ``"matched"``; recorded in ``meta["matched"]``.
        task_bn: the per-attack-type statistics of a run with ``MetaConfig(task_bn=True)``
            (``TrainResult.task_bn``); needed by ``"task_bn"``. The chosen type per attack is in
            ``RobustnessReport.meta["task_bn_types"]``.
        step_bn: the per-step statistics of a run with ``MetaConfig(per_step_bn=True)`` (``TrainResult.step_bn``,
            K inner steps). The ``"sgd"`` adaptation's step k then normalizes with set min(k, K) (set 0: the
            model's own) and the adapted model with set K, measured at the adapted parameters in training;
            zero-shot and the other methods are unchanged.
        artifacts: what a meta-trained run's options learned for adaptation (``TrainResult.artifacts``): they
            supply ``adapt_lr`` (Meta-SGD's step sizes), ``task_bn`` and ``step_bn``, which are then not given
            directly.
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
    atks = resolve_attacks(attacks)
    methods = _check_options(adapt_shots, adapt_steps, adapt_lr, adapt_methods, bn_momentum, bn_mix_momentum,
                             n_examples, batch_size)  # fmt: skip
    adapt_lr, task_bn, step_bn = _with_artifacts(artifacts, adapt_lr, task_bn, step_bn)
    if adapt_shots > 0:
        _check_methods(model, methods, task_bn, inner_loop)
    check_inner_options(model, adapt_lr, adapt_params, adapt_proximal, step_bn)
    if inner_loop is not None:
        check_inner_options(model, inner_loop.lr, inner_loop.inner_params, inner_loop.proximal, inner_loop.step_bn)
    steps_lr = {m: (adapt_steps, adapt_lr) for m in FINETUNING if m in methods} | _check_finetune(finetune, methods)
    run = prepare(model, data, n_examples, adapt_shots, seed, device)
    how = {"steps": adapt_steps, "lr": adapt_lr, "inner_params": adapt_params, "proximal": adapt_proximal,
           "step_sets": _step_sets(step_bn, run), "momentum": bn_momentum, "batch_size": batch_size, "task_bn": task_bn,
           "chosen": {}}  # fmt: skip
    plans = _plans(methods, steps_lr, bn_mix_momentum, inner_loop, run) if adapt_shots else {}
    (x, y), runs = run.query, len(atks) * (1 + len(plans))
    with isolated(model), tqdm(total=runs, desc="evaluate", disable=not progress) as bar:
        fn = model_fn(model, run.params, run.buffers)
        clean = correct(fn, x, y, batch_size)
        masks = {}
        for spec, atk in atks.items():
            masks[spec] = attack_correct(atk, spec, fn, x, y, batch_size, seed)
            logger.info("%s: %.1f%% (clean %.1f%%)", spec, percent(masks[spec]), percent(clean))
            bar.update()
        adapted, adapted_clean, survive = ({}, {}, {}) if not plans else adapted_results(
            model, run.params, run.buffers, atks, plans, run.query, run.support, seed, how, bar)  # fmt: skip

    union = clean.clone()
    for mask in masks.values():
        union &= mask
    meta = {"seed": seed, "torch": torch.__version__, "device": str(run.device), "batch_size": batch_size,
            "adapt_methods": list(plans), "adapt_steps": adapt_steps, "adapt_params": adapt_params,
            "adapt_proximal": adapt_proximal, "bn_momentum": bn_momentum, "adapt_lr": _lr_value(adapt_lr),
            "step_bn": step_bn is not None}  # fmt: skip
    if plans:  # each adaptation's own settings, where it has some
        meta |= _adaptation_meta(plans, steps_lr, bn_mix_momentum, inner_loop, how["chosen"])
    return RobustnessReport(
        clean_acc=frac(clean), per_attack={spec: frac(m) for spec, m in masks.items()}, union_acc=frac(union),
        n_examples=len(y), attacks=tuple(atks), adapt_shots=adapt_shots, adapted=adapted,
        adapted_union={m: frac(v) for m, v in survive.items()}, adapted_clean=adapted_clean,
        seconds=time.perf_counter() - start, meta=meta,
    )  # fmt: skip


@dataclass(frozen=True)
class Prepared:
    """A model's functional copy on the evaluation device and the examples: evaluation ``query`` (x (n, C, H, W),
    y (n,)) and the disjoint support pool ``support`` (shots of them)."""

    device: torch.device
    params: Params  # detached
    buffers: Params
    query: tuple[Tensor, Tensor]
    support: tuple[Tensor, Tensor]


def prepare(
    model: nn.Module, data: Any, n_examples: int | None, shots: int, seed: int, device: str | torch.device | None
) -> Prepared:
    """Check the data and the model's output on it, split it (``_split``) and copy the model's tensors to
    ``device`` (default: where they are; the model itself never moves)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    x_all, y_all = to_tensors(data)
    check_images(x_all, "data images")
    eval_idx, support_idx = _split(len(x_all), n_examples, shots, seed)
    params, buffers = state(model)
    dev = torch.device(device) if device is not None else _default_device(params, buffers)
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), x_all.dtype)
    params = {k: v.detach().to(dev) for k, v in params.items()}  # a functional copy: the model never moves
    buffers = {k: v.to(dev) for k, v in buffers.items()}
    x, y = x_all[eval_idx].to(dev, dtype), y_all[eval_idx].to(dev)  # (n, C, H, W), (n,)
    with eval_mode(model), torch.no_grad():
        n_out = check_logits(model_fn(model, params, buffers)(x[:1]), 1).shape[1]
    check_labels(y_all, len(y_all), n_out, "data labels")
    return Prepared(dev, params, buffers, (x, y), (x_all[support_idx].to(dev, dtype), y_all[support_idx].to(dev)))


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode and the caller's RNG state saved (attacks are seeded)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with eval_mode(model), torch.random.fork_rng(devices=cuda):
        yield


def _with_artifacts(artifacts: Mapping[str, Any] | None, adapt_lr: Any, task_bn: Any, step_bn: Any) -> tuple:
    """``adapt_lr``, ``task_bn`` and ``step_bn``, from ``artifacts`` where they supply them (not given twice)."""
    if not artifacts:
        return adapt_lr, task_bn, step_bn
    given = {"adapt_lr": adapt_lr if isinstance(adapt_lr, Mapping) else None, "task_bn": task_bn, "step_bn": step_bn}
    found = artifact_eval_options(artifacts)
    twice = sorted(k for k in found if given.get(k) is not None)
    if twice:
        raise ValueError(f"{twice} given both directly and through artifacts: pass one of them")
    return found.get("adapt_lr", adapt_lr), found.get("task_bn", task_bn), found.get("step_bn", step_bn)


def _lr_value(lr: Any) -> Any:
    """A step size as a report records it: the number, or ``"learned"`` for a tensor per parameter."""
    return "learned" if isinstance(lr, Mapping) else lr


def _adaptation_meta(plans: Mapping[str, Plan], steps_lr: Mapping[str, tuple[int, Any]], mix: float,
                     inner_loop: InnerLoopSpec | None, chosen: Mapping[str, str]) -> dict[str, Any]:  # fmt: skip
    """What a report records of the adaptations that ran: the fine-tuning methods' (steps, lr), ``"bn_mix"``'s
    momentum, ``"matched"``'s inner loop, ``"task_bn"``'s chosen type per attack."""
    meta: dict[str, Any] = {}
    if steps_lr:
        meta["finetune"] = {m: {"steps": steps, "lr": _lr_value(lr)} for m, (steps, lr) in steps_lr.items()}
    if "bn_mix" in plans:
        meta["bn_mix_momentum"] = mix
    if "matched" in plans and inner_loop is not None:
        meta["matched"] = inner_loop.describe()
    if chosen:
        meta["task_bn_types"] = dict(chosen)
    return meta


def _plans(methods: Sequence[str], steps_lr: Mapping[str, tuple[int, Any]], mix: float,
           inner_loop: InnerLoopSpec | None, run: Prepared) -> dict[str, Plan]:  # fmt: skip
    """method -> (method, its own settings): the fine-tuning methods' (steps, lr), ``"bn_mix"``'s momentum,
    ``"matched"``'s inner loop; step sizes on the evaluation device in the parameters' dtype."""
    dtype = run.query[0].dtype  # the parameters'

    def on_device(lr: Any) -> Any:
        return {k: v.detach().to(run.device, dtype) for k, v in lr.items()} if isinstance(lr, Mapping) else lr

    plans: dict[str, Plan] = {}
    for m in methods:
        changes: dict[str, Any] = {}
        if m in steps_lr:
            changes = {"steps": steps_lr[m][0], "lr": on_device(steps_lr[m][1])}
        elif m == "bn_mix":
            changes = {"momentum": mix}
        elif m == "matched" and inner_loop is not None:
            loop = inner_loop
            changes = {"steps": loop.steps, "lr": on_device(loop.lr), "inner_params": loop.inner_params,
                       "proximal": loop.proximal, "step_sets": _step_sets(loop.step_bn, run)}  # fmt: skip
        plans[m] = (m, changes)
    return plans


def _step_sets(step_bn: StepBatchNorm | None, run: Prepared) -> list[Params]:
    """BatchNorm statistics per inner step on the evaluation device: ``[buffers, set 1, ..., set K]`` (``[buffers]``
    without per-step statistics)."""
    stats = step_bn.stats if step_bn is not None else []
    return [run.buffers, *({k: v.to(run.device) for k, v in s.items()} for s in stats)]


def _check_methods(model: nn.Module, methods: Sequence[str], task_bn: object, inner_loop: object) -> None:
    if "task_bn" in methods and not isinstance(task_bn, TaskBatchNorm):
        raise ValueError(
            "adapt method 'task_bn' needs the per-type BatchNorm statistics of a run with MetaConfig(task_bn=True): "
            f"pass task_bn=result.task_bn, got {type(task_bn).__name__}"
        )
    if "matched" in methods and not isinstance(inner_loop, InnerLoopSpec):
        raise ValueError(
            "adapt method 'matched' adapts with the inner loop the model was meta-trained with: pass "
            "inner_loop=InnerLoopSpec.from_config(meta_config, result.artifacts) (a model that was not "
            f"meta-trained has none), got inner_loop={type(inner_loop).__name__}"
        )
    needs_bn = [m for m in methods if m in BN_METHODS]
    if needs_bn and not batchnorm_layers(model):
        raise ValueError(
            f"adapt methods {needs_bn} re-estimate BatchNorm statistics, but the model has no BatchNorm layer "
            f"tracking running statistics; use adapt_methods=('sgd',) for {type(model).__name__}"
        )


def _check_options(
    shots: object,
    steps: object,
    lr: object,
    methods: object,
    bn_momentum: object,
    bn_mix_momentum: object,
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
    for name, m in (("bn_momentum", bn_momentum), ("bn_mix_momentum", bn_mix_momentum)):
        if m is not None or name == "bn_mix_momentum":
            check_positive(m, name)
            if m > 1:  # type: ignore[operator]
                raise ValueError(f"{name} must be in (0, 1]{' or None' if name == 'bn_momentum' else ''}, got {m!r}")
    methods = (methods,) if isinstance(methods, str) else tuple(methods)  # type: ignore[arg-type]
    bad = [m for m in methods if m not in ADAPT_METHODS]
    if bad or not methods:
        raise ValueError(f"unknown adapt_methods {bad or list(methods)}; allowed: {list(ADAPT_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"adapt_methods lists a method twice: {list(methods)}")
    return methods


def _check_finetune(finetune: Mapping[str, Any] | None, methods: Sequence[str]) -> dict[str, FineTune]:
    """``finetune``'s (steps, lr) per fine-tuning method, checked: a method of ``methods``, steps >= 0, lr > 0
    (None iff steps is 0)."""
    if finetune is None:
        return {}
    if not isinstance(finetune, Mapping):
        raise TypeError(f"finetune must map a fine-tuning method to (steps, lr), got {type(finetune).__name__}")
    out = {}
    for m, value in finetune.items():
        if m not in FINETUNING or m not in methods:
            raise ValueError(f"finetune names {m!r}: it sets a fine-tuning method of adapt_methods "
                             f"({[f for f in FINETUNING if f in methods]})")  # fmt: skip
        if not isinstance(value, Sequence) or len(value) != 2:
            raise TypeError(f"finetune[{m!r}] must be (steps, lr), got {value!r}")
        steps, lr = value
        check_positive(steps, f"finetune[{m!r}] steps", allow_zero=True, integer=True)
        if (lr is None) != (steps == 0):
            raise ValueError(f"finetune[{m!r}]: lr must be None exactly when steps is 0, got {value!r}")
        if lr is not None:
            check_positive(lr, f"finetune[{m!r}] lr")
        out[m] = (steps, lr)
    return out


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
