"""Robustness evaluation: clean, per-attack and union accuracy, zero-shot and after few-shot adaptation.

Every attack runs white-box against the model being reported, in eval mode, on [0, 1] images. With
``adapt_shots > 0`` each attack also crafts a small support set from examples disjoint from the
evaluation examples, the model is adapted to it (SGD fine-tuning and/or test-time BatchNorm statistics),
and the attack is re-run against the *adapted* model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import attacks as _attacks
from .config import INNER_PARAMS
from .data import to_tensors
from .functional import (
    ModelFn,
    Params,
    batchnorm_layers,
    batchnorm_training,
    call,
    clone_buffers,
    detach,
    eval_mode,
    model_fn,
    state,
)
from .meta.inner import LearningRate, adapt, inner_parameter_names
from .meta.options.film import encoding_of, task_code, with_code
from .meta.options.step_bn import StepBatchNorm
from .meta.options.task_bn import TaskBatchNorm
from .validation import check_images, check_labels, check_logits, check_positive

__all__ = ["ADAPT_METHODS", "RobustnessReport", "evaluate"]

logger = logging.getLogger(__name__)

ADAPT_METHODS = ("sgd", "bn", "task_bn")  # SGD fine-tuning; test-time BN statistics; nearest per-type BN statistics


@dataclass(frozen=True)
class RobustnessReport:
    """Accuracies in [0, 1] of one model on one evaluation set; attacks are named by their canonical spec."""

    clean_acc: float  # accuracy on the clean evaluation examples
    per_attack: dict[str, float]  # spec -> accuracy on that attack's adversarial examples (all points)
    union_acc: float  # fraction correct on clean inputs AND under every attack
    n_examples: int  # evaluation examples (the support pool is disjoint from them)
    attacks: tuple[str, ...]  # specs, in the order given
    adapt_shots: int = 0  # support examples per attack for few-shot adaptation (0: zero-shot only)
    adapted: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> spec -> accuracy
    adapted_union: dict[str, float] = field(default_factory=dict)  # method -> union over per-attack models
    adapted_clean: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> spec -> clean acc
    seconds: float = 0.0  # wall-clock time of the evaluation
    meta: dict[str, Any] = field(default_factory=dict)  # seed, torch version, device, options

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON types (``attacks`` as a list)."""
        d = dataclasses.asdict(self)
        d["attacks"] = list(self.attacks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RobustnessReport:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RobustnessReport fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**{**d, "attacks": tuple(d.get("attacks", ()))})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> RobustnessReport:
        return cls.from_dict(json.loads(s))

    def to_markdown(self) -> str:
        """A table in percent: rows clean, each attack, union; columns zero-shot and ``method@shots``.

        The clean row of an adaptation column is the mean clean accuracy over the per-attack adapted models.
        """
        methods = list(self.adapted)
        header = ["", "zero-shot", *(f"{m}@{self.adapt_shots}" for m in methods)]

        def pct(v: float | None) -> str:
            return "–" if v is None else f"{100 * v:.1f}"

        def mean(values: Mapping[str, float]) -> float | None:
            return sum(values.values()) / len(values) if values else None

        rows = [["clean", pct(self.clean_acc), *(pct(mean(self.adapted_clean.get(m, {}))) for m in methods)]]
        for spec in self.attacks:
            name = "`" + spec.replace("|", "\\|") + "`"
            rows.append([name, pct(self.per_attack[spec]), *(pct(self.adapted[m].get(spec)) for m in methods)])
        rows.append(["union", pct(self.union_acc), *(pct(self.adapted_union.get(m)) for m in methods)])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        note = f"\nAccuracy (%) on {self.n_examples} evaluation examples."
        if methods:
            note += (
                f" `method@{self.adapt_shots}`: each attack re-run against the model adapted to "
                f"{self.adapt_shots} of its adversarial examples; clean: mean over those models."
            )
        lines.append(note)
        return "\n".join(lines)


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
    atks = _resolve_attacks(attacks)
    methods = _check_options(adapt_shots, adapt_steps, adapt_lr, adapt_methods, bn_momentum, n_examples, batch_size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if adapt_shots > 0 and "task_bn" in methods and not isinstance(task_bn, TaskBatchNorm):
        raise ValueError(
            "adapt method 'task_bn' needs the per-type BatchNorm statistics of a run with MetaConfig(task_bn=True): "
            f"pass task_bn=result.task_bn, got {type(task_bn).__name__}"
        )
    if adapt_shots > 0 and {"bn", "task_bn"} & set(methods) and not batchnorm_layers(model):
        raise ValueError(
            "adapt method 'bn' re-estimates BatchNorm statistics, but the model has no BatchNorm layer "
            f"tracking running statistics; use adapt_methods=('sgd',) for {type(model).__name__}"
        )
    _check_inner_options(model, adapt_lr, adapt_params, adapt_proximal, step_bn)
    x_all, y_all = to_tensors(data)
    check_images(x_all, "data images")
    eval_idx, support_idx = _split(len(x_all), n_examples, adapt_shots, seed)

    params, buffers = state(model)
    dev = torch.device(device) if device is not None else _default_device(params, buffers)
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), x_all.dtype)
    params = {k: v.detach().to(dev) for k, v in params.items()}  # a functional copy: the model never moves
    buffers = {k: v.to(dev) for k, v in buffers.items()}
    lr = {k: v.detach().to(dev, dtype) for k, v in adapt_lr.items()} if isinstance(adapt_lr, Mapping) else adapt_lr
    step_sets = [buffers, *({k: v.to(dev) for k, v in s.items()} for s in step_bn.stats)] if step_bn else [buffers]
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
            clean = _correct(fn, x, y, batch_size)
            masks = {}
            for spec, atk in atks.items():
                masks[spec] = _attack_correct(atk, spec, fn, x, y, batch_size, seed)
                logger.info("%s: %.1f%% (clean %.1f%%)", spec, _acc(masks[spec]), _acc(clean))
                bar.update()
            adapted, adapted_clean, survive, chosen = {}, {}, {}, {}
            if adapt_shots:
                opts = {
                    "steps": adapt_steps,
                    "lr": lr,
                    "inner_params": adapt_params,
                    "proximal": adapt_proximal,
                    "step_sets": step_sets,
                    "momentum": bn_momentum,
                    "batch_size": batch_size,
                    "task_bn": task_bn,
                    "chosen": chosen,
                }
                adapted, adapted_clean, survive = _adapted_results(
                    model, params, buffers, atks, methods, (x, y), (x_s, y_s), seed, opts, bar
                )

    union = clean.clone()
    for mask in masks.values():
        union &= mask
    return RobustnessReport(
        clean_acc=_frac(clean),
        per_attack={spec: _frac(m) for spec, m in masks.items()},
        union_acc=_frac(union),
        n_examples=len(eval_idx),
        attacks=tuple(atks),
        adapt_shots=adapt_shots,
        adapted=adapted,
        adapted_union={m: _frac(v) for m, v in survive.items()},
        adapted_clean=adapted_clean,
        seconds=time.perf_counter() - start,
        meta={
            "seed": seed,
            "torch": torch.__version__,
            "device": str(dev),
            "batch_size": batch_size,
            "adapt_methods": list(methods) if adapt_shots else [],
            "adapt_steps": adapt_steps,
            "adapt_lr": "learned" if isinstance(adapt_lr, Mapping) else adapt_lr,  # learned: a tensor per parameter
            "adapt_params": adapt_params,
            "adapt_proximal": adapt_proximal,
            "step_bn": step_bn is not None,
            "bn_momentum": bn_momentum,
            **({"task_bn_types": chosen} if chosen else {}),
        },
    )


def _adapted_results(
    model: nn.Module,
    params: Params,
    buffers: Params,
    atks: Mapping[str, Callable[..., Tensor]],
    methods: tuple[str, ...],
    query: tuple[Tensor, Tensor],
    support: tuple[Tensor, Tensor],
    seed: int,
    opts: dict[str, Any],
    bar: tqdm,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, Tensor]]:
    """Per method: accuracy under each attack re-run against the model adapted to that attack's support
    set, clean accuracy of that adapted model, and the per-example mask of surviving every one of them."""
    (x, y), (x_s, y_s) = query, support
    adapted = {m: {} for m in methods}
    adapted_clean = {m: {} for m in methods}
    survive = {m: torch.ones_like(y, dtype=torch.bool) for m in methods}
    fn = model_fn(model, params, buffers)
    for spec, atk in atks.items():
        torch.manual_seed(seed)
        x_adv_s = _craft(atk, spec, fn, x_s, y_s, opts["batch_size"])  # against the unadapted model
        code = None  # a FiLM model's task code inferred from the support set's perturbations (film.py)
        if encoding_of(model) == "support":
            with torch.no_grad():
                code = task_code(model, params, support_adv=x_adv_s, support_clean=x_s)
        for method in methods:
            fn_a = _adapted_fn(method, model, params, buffers, x_adv_s, y_s, spec=spec, code=code, **opts)
            clean_a = _correct(fn_a, x, y, opts["batch_size"])
            mask = _attack_correct(atk, spec, fn_a, x, y, opts["batch_size"], seed)  # white-box, adapted
            survive[method] &= clean_a & mask
            adapted[method][spec], adapted_clean[method][spec] = _frac(mask), _frac(clean_a)
            logger.info("%s@%d %s: %.1f%%", method, len(y_s), spec, _acc(mask))
            bar.update()
    return adapted, adapted_clean, survive


# ----------------------------------------------------------------------------- checks and set-up


def _resolve_attacks(attacks: Any) -> dict[str, Callable[..., Tensor]]:
    """spec -> attack, in the order given. Accepts one attack or a sequence of specs/dicts/Attacks."""
    if isinstance(attacks, (str, Mapping)) or _is_attack(attacks):
        attacks = [attacks]
    if not isinstance(attacks, Sequence):
        raise TypeError(f"attacks must be an attack spec or a sequence of them, got {type(attacks).__name__}")
    if len(attacks) == 0:
        raise ValueError("attacks is empty: give at least one attack spec, e.g. ['pgd_linf(eps=0.3)']")
    out: dict[str, Callable[..., Tensor]] = {}
    for a in attacks:
        atk = a if _is_attack(a) else _attacks.make(a)
        if atk.spec in out:
            raise ValueError(f"attack {atk.spec!r} is listed twice")
        out[atk.spec] = atk
    return out


def _is_attack(a: object) -> bool:
    """An ``Attack`` or anything shaped like one: callable ``(model_fn, x, y) -> x_adv`` with a ``.spec``."""
    return not isinstance(a, (str, Mapping)) and callable(a) and isinstance(getattr(a, "spec", None), str)


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
    if not isinstance(lr, Mapping):  # a mapping (learned step sizes) is checked by _check_inner_options
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


def _check_inner_options(model: nn.Module, lr: object, inner_params: object, proximal: object, step_bn: object) -> None:
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


# ----------------------------------------------------------------------------- attacks and adaptation


def _frac(mask: Tensor) -> float:
    return int(mask.sum()) / mask.numel()


def _acc(mask: Tensor) -> float:
    return 100 * _frac(mask)


def _batches(x: Tensor, y: Tensor, batch_size: int) -> zip:
    return zip(x.split(batch_size), y.split(batch_size), strict=True)


def _correct(fn: ModelFn, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Per-example correctness (N,) bool."""
    with torch.no_grad():
        return torch.cat([fn(xb).argmax(1) == yb for xb, yb in _batches(x, y, batch_size)])


def _craft(atk: Callable[..., Tensor], spec: str, fn: ModelFn, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Adversarial examples of ``x`` against ``fn``, checked: images in [0, 1] inside the attack's ball."""
    out = []
    for xb, yb in _batches(x, y, batch_size):
        with torch.enable_grad():
            xa = atk(fn, xb, yb)
        if not isinstance(xa, Tensor) or xa.shape != xb.shape:
            raise ValueError(f"attack {spec!r} must return a tensor of shape {tuple(xb.shape)}")
        xa = check_images(xa.detach(), f"adversarial examples of {spec!r}")
        _check_ball(atk, spec, xa - xb)
        out.append(xa)
    return torch.cat(out)


def _attack_correct(
    atk: Callable[..., Tensor], spec: str, fn: ModelFn, x: Tensor, y: Tensor, batch_size: int, seed: int
) -> Tensor:
    """Per-example correctness under ``atk`` run white-box against ``fn`` (reseeded: order-independent)."""
    torch.manual_seed(seed)
    return _correct(fn, _craft(atk, spec, fn, x, y, batch_size), y, batch_size)


_ORD = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}


def _check_ball(atk: object, spec: str, delta: Tensor) -> None:
    norm, eps = getattr(atk, "norm", None), getattr(atk, "eps", None)
    if norm not in _ORD or not isinstance(eps, (int, float)):
        return
    size = float(delta.flatten(1).norm(p=_ORD[norm], dim=1).max())
    if size > eps * (1 + 1e-4) + 1e-5:
        warnings.warn(
            f"attack {spec!r} left its {norm} ball: perturbation {size:.6g} > eps {eps}; its numbers are not "
            "a valid robustness measurement",
            RuntimeWarning,
            stacklevel=4,
        )


def _adapted_fn(
    method: str,
    model: nn.Module,
    params: Params,
    buffers: Params,
    x_s: Tensor,
    y_s: Tensor,
    *,
    steps: int,
    lr: LearningRate,
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
    with set K. ``code``: a FiLM model's task code (dim,), used in every forward pass (None: the model's own)."""
    if code is not None:
        buffers, step_sets = with_code(buffers, code), [with_code(b, code) for b in step_sets]
    if method == "sgd":
        per_step = [clone_buffers(step_sets[min(k, len(step_sets) - 1)]) for k in range(steps)]
        theta = adapt(model, x_s, y_s, params=params, buffers=per_step, steps=steps, lr=lr, first_order=True,
                      inner_params=inner_params, proximal=proximal)  # fmt: skip
        return model_fn(model, detach(theta), step_sets[-1])
    support = _support_bn_buffers(model, params, buffers, x_s, None if method == "task_bn" else momentum, batch_size)
    if method == "bn":
        return model_fn(model, params, support)
    k = task_bn.nearest(model, support)  # type: ignore[union-attr]
    chosen[spec] = task_bn.names[k]  # type: ignore[union-attr]
    typed = {n: v.to(support[n].device) for n, v in task_bn.buffers(k).items()}  # type: ignore[union-attr]
    return model_fn(model, params, typed if code is None else with_code(typed, code))


def _support_bn_buffers(
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
