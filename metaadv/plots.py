"""Matplotlib figures: robustness bars from RobustnessReports, meta-training curves and task-attention weights.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, any backend): save them with
``fig.savefig("out.png")``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .eval import RobustnessReport

__all__ = ["PALETTE", "plot_task_weights", "robustness_bars", "training_curves"]

PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
)  # Okabe-Ito
HATCHES = ("//", "..", "xx", "\\\\", "++")  # one per adaptation method, in order of appearance
FIGSIZE = (7.0, 3.5)


def _axes(ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    return fig, fig.add_subplot()


def _wrap(spec: str, width: int = 14) -> str:
    """Break a long attack spec after '(', ',' or ':' so that tick labels of neighbours do not collide."""
    lines = [""]
    for part in re.split(r"(?<=[(,:])\s*", spec):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += (" " if lines[-1].endswith(",") else "") + part
    return "\n".join(lines)


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """The moving average of ``values`` over ``window`` points ("valid": one point per full window);
    the values themselves when there are fewer than ``window``."""
    v = np.asarray(values, dtype=float)
    return np.convolve(v, np.ones(window) / window, mode="valid") if len(v) >= window else v


def robustness_bars(
    reports: RobustnessReport | Mapping[str, RobustnessReport],
    *,
    ax: Axes | None = None,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Grouped bars of accuracy (%): clean, each attack, union; one color per report (method).

    Adapted results (``method@shots``) appear as hatched bars beside the zero-shot bar, in the report's
    color. Colors come from a fixed palette indexed by the sorted report names (or from ``colors``).
    """
    if isinstance(reports, RobustnessReport):
        reports = {"": reports}
    if not reports:
        raise ValueError("reports is empty: give a RobustnessReport or a dict name -> RobustnessReport")
    names = list(reports)
    palette = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(names))}
    palette.update(colors or {})
    specs = list(dict.fromkeys(s for r in reports.values() for s in r.attacks))
    groups = ["clean", *specs, "union"]
    methods = list(dict.fromkeys(m for r in reports.values() for m in r.adapted))
    bars = [(n, None) for n in names] + [(n, m) for n in names for m in methods if m in reports[n].adapted]
    bars.sort(key=lambda b: names.index(b[0]))  # each report's bars side by side

    fig, ax = _axes(ax)
    width = 0.8 / len(bars)
    pos = np.arange(len(groups))
    for i, (name, method) in enumerate(bars):
        r = reports[name]
        if method is None:
            zs = r.per_attack
            values = [r.clean_acc, *(zs.get(s, np.nan) for s in specs), r.union_acc]
            label, hatch = name or "zero-shot", None
        else:
            ad, cl = r.adapted[method], r.adapted_clean.get(method, {})
            clean = float(np.mean(list(cl.values()))) if cl else np.nan
            values = [clean, *(ad.get(s, np.nan) for s in specs), r.adapted_union.get(method, np.nan)]
            label = f"{name} {method}@{r.adapt_shots}".strip()
            hatch = HATCHES[methods.index(method) % len(HATCHES)]
        ax.bar(
            pos + (i - (len(bars) - 1) / 2) * width,
            100 * np.asarray(values, dtype=float),
            width,
            label=label,
            color="white" if hatch else palette[name],
            edgecolor=palette[name],
            hatch=hatch,
        )
    ax.set_xticks(pos, [_wrap(g) for g in groups], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    return fig


def training_curves(
    history: Sequence[Mapping[str, Any]],
    *,
    ax: Axes | Sequence[Axes] | None = None,
    smooth: int = 1,
) -> Figure:
    """Meta-loss (left) and mean query accuracy (%) per attack type (right) against the meta-step.

    ``history`` is a list of dicts with ``"step"``, the meta-loss as ``"meta_loss"`` or ``"loss"`` (as in
    ``TrainResult.history``) and, optionally, ``"task_names"`` and ``"query_acc"`` (fractions in [0, 1],
    one per task of the step). A task type sampled twice in one step is averaged. ``smooth`` is a
    moving-average window over each curve's points. ``ax`` may be two axes (loss, accuracy) or one, on
    which accuracy goes to a twin y-axis.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    if smooth < 1:
        raise ValueError(f"smooth must be a window of >= 1 points, got {smooth}")
    losses = []
    for i, h in enumerate(history):
        key = "meta_loss" if "meta_loss" in h else "loss"
        if "step" not in h or key not in h:
            raise ValueError(f"history[{i}] needs 'step' and 'meta_loss' (or 'loss'); it has {sorted(h)}")
        losses.append(float(h[key]))

    per_task: dict[str, dict[int, list[float]]] = {}
    for h in history:
        for name, acc in zip(h.get("task_names", ()), h.get("query_acc", ()), strict=True):
            per_task.setdefault(name, {}).setdefault(int(h["step"]), []).append(float(acc))

    if ax is None:
        fig = Figure(figsize=FIGSIZE, layout="constrained")
        ax_loss, ax_acc = fig.subplots(1, 2)
    elif isinstance(ax, Axes):
        fig, ax_loss, ax_acc = ax.figure, ax, ax.twinx()
    else:
        ax_loss, ax_acc = ax
        fig = ax_loss.figure
    steps = [int(h["step"]) for h in history]
    loss = _moving_average(losses, smooth)
    ax_loss.plot(steps[len(steps) - len(loss) :], loss, color="0.2", label="meta-loss")
    ax_loss.set_xlabel("meta-step")
    ax_loss.set_ylabel("meta-loss (cross-entropy)")
    for i, name in enumerate(sorted(per_task)):
        xs = sorted(per_task[name])
        acc = _moving_average([100 * np.mean(per_task[name][s]) for s in xs], smooth)
        ax_acc.plot(xs[len(xs) - len(acc) :], acc, color=PALETTE[i % len(PALETTE)], label=name)
    ax_acc.set_xlabel("meta-step")
    ax_acc.set_ylabel("query accuracy (%)")
    ax_acc.set_ylim(0, 100)
    if per_task:
        ax_acc.legend(fontsize=7)
    return fig


def plot_task_weights(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    *,
    ax: Axes | None = None,
    smooth: int = 10,
) -> Figure:
    """Task attention's weight of each attack type against the meta-step, with the uniform weight 1/T.

    ``history`` is a list of dicts with ``"step"``, ``"task_names"`` and ``"task_weights"`` (one weight
    per task of the step, as ``meta_train`` records with ``MetaConfig(task_attention=True)``); records
    without ``"task_weights"`` are skipped. Each type's curve is its mean weight over the steps where it
    was sampled (a type sampled twice in one step is averaged), smoothed by a moving average over
    ``smooth`` of those points. A weight above 1/T means the type counted more than in plain MAML.
    Colors follow ``training_curves`` (the sorted type names index ``PALETTE``). ``path``: also save the
    figure there.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    if smooth < 1:
        raise ValueError(f"smooth must be a window of >= 1 points, got {smooth}")
    per_task: dict[str, dict[int, list[float]]] = {}
    uniform: dict[int, float] = {}  # step -> 1/T
    for i, h in enumerate(history):
        if "task_weights" not in h:
            continue
        names, weights = h.get("task_names"), h["task_weights"]
        if "step" not in h or names is None or len(names) != len(weights) or not weights:
            raise ValueError(
                f"history[{i}] needs 'step' and one 'task_names' entry per 'task_weights' entry; it has "
                f"{sorted(h)} with {len(names or ())} names and {len(weights)} weights"
            )
        step = int(h["step"])
        uniform[step] = 1 / len(weights)
        for name, w in zip(names, weights, strict=True):
            per_task.setdefault(name, {}).setdefault(step, []).append(float(w))
    if not uniform:
        raise ValueError(
            "no record of history has 'task_weights': train with task attention on "
            "(MetaConfig(task_attention=True)) to record them"
        )

    fig, ax = _axes(ax)
    steps = sorted(uniform)
    ax.plot(steps, [uniform[s] for s in steps], color="0.5", linestyle="--", linewidth=1, label="uniform (1/T)")
    for i, name in enumerate(sorted(per_task)):
        xs = sorted(per_task[name])
        w = _moving_average([np.mean(per_task[name][s]) for s in xs], smooth)
        ax.plot(xs[len(xs) - len(w) :], w, color=PALETTE[i % len(PALETTE)], label=name)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("task weight")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if path is not None:
        fig.savefig(path)
    return fig
