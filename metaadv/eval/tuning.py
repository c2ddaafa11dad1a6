"""Fine-tuning chosen per model: the steps and learning rate of ``"sgd"`` or ``"bn_sgd"`` that adapt it best on
validation examples, from a small grid (docs/adaptation.md, "Tuning")."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..functional import batchnorm_layers
from ..validation import check_positive
from .accuracy import resolve_attacks
from .adaptation import FINETUNING, adapted_results
from .evaluate import isolated, prepare

__all__ = ["FINETUNE_GRID", "Tuning", "tune_finetuning"]

FINETUNE_GRID: Mapping[str, tuple[float, ...]] = {"steps": (1, 3, 10), "lr": (0.001, 0.01, 0.05)}


class Tuning(NamedTuple):
    """The chosen fine-tuning and every candidate's validation score."""

    steps: int  # the chosen SGD steps; 0: no step (the unadapted model; for "bn_sgd", "bn")
    lr: float | None  # the chosen learning rate; None with 0 steps
    scores: dict[tuple[int, float | None], float]  # (steps, lr) -> mean adapted accuracy over the attacks, in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        """JSON values: the choice and ``scores`` as a list of ``{"steps", "lr", "score"}``."""
        scores = [{"steps": s, "lr": lr, "score": v} for (s, lr), v in self.scores.items()]
        return {"steps": self.steps, "lr": self.lr, "scores": scores}


def tune_finetuning(
    model: nn.Module,
    val_data: Any,
    attacks: Any,
    shots: int,
    grid: Mapping[str, Sequence[float]] = FINETUNE_GRID,
    *,
    method: str = "sgd",
    n_examples: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Tuning:
    """Choose ``method``'s (steps, lr) for ``model`` on validation data, as ``evaluate`` would adapt it.

    Every candidate, ``(0, None)`` (no step) and each ``grid["steps"] x grid["lr"]``, adapts the model to each
    attack's adversarial support set of ``shots`` validation examples (crafted once against the unadapted model)
    and re-runs the attack white-box against the adapted model on the other validation examples, in eval mode,
    exactly as ``evaluate(model, val_data, attacks, adapt_shots=shots, adapt_methods=(method,), finetune={method:
    (steps, lr)}, n_examples=n_examples, seed=seed)`` does (all parameters, no proximal term; ``"bn_sgd"`` from
    the support set's BatchNorm statistics). The choice maximizes the mean adapted accuracy over the attacks;
    ties go to the earlier candidate: fewer steps, then the smaller lr (no step first).

    Args:
        model: the classifier, images in [0, 1] -> logits; left as it was (modes, parameters, buffers).
        val_data: validation examples, disjoint from the examples the chosen fine-tuning is reported on.
        attacks: attack specs or ``Attack`` objects, as for ``evaluate``.
        shots: support examples per attack (>= 1), the shots the choice will be used with.
        grid: ``{"steps": positive ints, "lr": positive floats}``.
        method: ``"sgd"`` or ``"bn_sgd"``.
        n_examples, batch_size, seed, device, progress: as for ``evaluate``.
    """
    if method not in FINETUNING:
        raise ValueError(f"method must be one of {FINETUNING}, got {method!r}")
    check_positive(shots, "shots", integer=True)
    candidates = [(0, None), *_grid(grid)]
    atks = resolve_attacks(attacks)
    if method == "bn_sgd" and not batchnorm_layers(model):
        raise ValueError(f"method 'bn_sgd' re-estimates BatchNorm statistics, but {type(model).__name__} has none")
    run = prepare(model, val_data, n_examples, shots, seed, device)
    plans = {f"steps={s}, lr={lr}": (method, {"steps": s, "lr": lr}) for s, lr in candidates}
    how = {"inner_params": "all", "proximal": 0.0, "step_sets": [run.buffers], "momentum": None,
           "batch_size": batch_size, "task_bn": None, "chosen": {}}  # fmt: skip
    with isolated(model), tqdm(total=len(atks) * len(plans), desc="tune", disable=not progress) as bar:
        adapted, _, _ = adapted_results(model, run.params, run.buffers, atks, plans, run.query, run.support, seed,
                                        how, bar)  # fmt: skip
    scores = {c: statistics.fmean(adapted[name].values()) for c, name in zip(candidates, plans, strict=True)}
    steps, lr = max(candidates, key=scores.__getitem__)  # the first of equal scores
    return Tuning(steps, lr, scores)


def _grid(grid: Mapping[str, Sequence[float]]) -> list[tuple[int, float]]:
    """The (steps, lr) candidates of ``grid``, checked, in order: steps ascending, then lr ascending."""
    if not isinstance(grid, Mapping) or set(grid) != {"steps", "lr"}:
        raise ValueError(f"grid must be a mapping with keys 'steps' and 'lr', got {grid!r}")
    for key in ("steps", "lr"):
        values = grid[key]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty sequence, got {values!r}")
        for v in values:
            check_positive(v, f"grid[{key!r}] entry", integer=key == "steps")
        if len(set(values)) != len(values):
            raise ValueError(f"grid[{key!r}] lists a value twice: {list(values)}")
    return [(int(s), float(lr)) for s in sorted(grid["steps"]) for lr in sorted(grid["lr"])]
