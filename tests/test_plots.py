"""Plots: the expected bars and lines, consistent colors, labelled axes, and PNGs that save."""

from __future__ import annotations

import matplotlib
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from metaadv.eval import RobustnessReport
from metaadv.plots import plot_task_weights, robustness_bars, training_curves

SPECS = ("fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=10)", "pgd_l2(eps=2.0, steps=10)")


def report(adapted: bool = False, base: float = 0.5) -> RobustnessReport:
    per = {s: base - 0.1 * i for i, s in enumerate(SPECS)}
    methods = ("sgd", "bn") if adapted else ()
    return RobustnessReport(
        clean_acc=0.95,
        per_attack=per,
        union_acc=min(per.values()) - 0.05,
        n_examples=100,
        attacks=SPECS,
        adapt_shots=32 if adapted else 0,
        adapted={m: {s: v + 0.05 for s, v in per.items()} for m in methods},
        adapted_union={m: 0.2 for m in methods},
        adapted_clean={m: dict.fromkeys(SPECS, 0.9) for m in methods},
    )


def bar_colors(fig: Figure) -> dict[str, str]:
    ax = fig.axes[0]
    return {c.get_label(): to_hex(c.patches[0].get_edgecolor()) for c in ax.containers}


def test_one_report_gives_one_bar_per_group(tmp_path):
    fig = robustness_bars(report(), title="ERM")
    ax = fig.axes[0]
    assert isinstance(fig, Figure) and len(ax.containers) == 1
    assert len(ax.patches) == len(SPECS) + 2  # clean, attacks, union
    assert ax.get_ylabel() == "accuracy (%)" and ax.get_title() == "ERM"
    assert ax.patches[0].get_height() == pytest.approx(95.0)
    fig.savefig(tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 1000


def test_several_reports_with_adapted_results_are_hatched_and_colored_consistently(tmp_path):
    reports = {"meta": report(adapted=True), "pgd-at": report(base=0.6)}
    fig = robustness_bars(reports)
    ax = fig.axes[0]
    assert len(ax.containers) == 4  # meta, meta sgd@32, meta bn@32, pgd-at
    assert len(ax.patches) == 4 * (len(SPECS) + 2)
    hatched = [c.get_label() for c in ax.containers if c.patches[0].get_hatch()]
    assert hatched == ["meta sgd@32", "meta bn@32"]
    colors = bar_colors(fig)
    assert colors["meta"] == colors["meta sgd@32"] != colors["pgd-at"]
    # same names -> same colors, whatever the order; an explicit mapping wins
    again = bar_colors(robustness_bars(dict(reversed(list(reports.items())))))
    assert again["meta"] == colors["meta"] and again["pgd-at"] == colors["pgd-at"]
    forced = bar_colors(robustness_bars(reports, colors={"meta": "#ff0000"}))
    assert forced["meta"] == "#ff0000"
    fig.savefig(tmp_path / "grouped.png")
    assert (tmp_path / "grouped.png").exists()


def test_bars_draw_on_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert robustness_bars(report(), ax=ax) is fig
    with pytest.raises(ValueError, match="empty"):
        robustness_bars({})


def history(steps: int = 6) -> list[dict]:
    names = [["fgsm", "pgd"], ["pgd", "pgd"], ["fgsm", "l2"]]
    return [
        {
            "step": s,
            "meta_loss": 2.0 / (s + 1),
            "task_names": names[s % 3],
            "query_acc": [0.1 * s / steps + 0.1 * i for i in range(2)],
        }
        for s in range(steps)
    ]


def test_training_curves_one_loss_line_and_one_accuracy_line_per_attack(tmp_path):
    fig = training_curves(history())
    ax_loss, ax_acc = fig.axes
    assert len(ax_loss.lines) == 1 and len(ax_acc.lines) == 3  # fgsm, l2, pgd
    assert ax_loss.get_xlabel() == "meta-step" and ax_acc.get_ylabel() == "query accuracy (%)"
    pgd = next(line for line in ax_acc.lines if line.get_label() == "pgd")
    assert list(pgd.get_xdata()) == [0, 1, 3, 4]
    assert pgd.get_ydata()[1] == pytest.approx(100 * (0.1 / 6 + 0.05))  # step 1: mean of both pgd tasks
    assert tuple(fig.get_size_inches()) == (7.0, 3.5)
    fig.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_training_curves_on_one_axes_smoothing_and_errors():
    fig = Figure()
    ax = fig.add_subplot()
    assert training_curves(history(), ax=ax, smooth=2) is fig
    assert len(ax.lines) == 1 and len(fig.axes) == 2  # accuracy on a twin axis
    assert len(ax.lines[0].get_xdata()) == 5
    with pytest.raises(ValueError, match="empty"):
        training_curves([])
    with pytest.raises(ValueError, match="meta_loss"):
        training_curves([{"step": 0, "task_names": [], "query_acc": []}])
    # TrainResult.history names the meta-loss "loss"; a history without tasks plots the loss alone
    fig = training_curves([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    assert [len(a.lines) for a in fig.axes] == [1, 0]


def weighted_history(steps: int = 30) -> list[dict]:
    """Task attention records: two tasks per step, pgd weighted 0.8 against fgsm or l2 (sampled in turn)."""
    names = [["pgd", "fgsm"], ["l2", "pgd"], ["fgsm", "fgsm"]]
    weights = [[0.8, 0.2], [0.2, 0.8], [0.4, 0.6]]
    return [{"step": s, "loss": 1.0, "task_names": names[s % 3], "task_weights": weights[s % 3]} for s in range(steps)]


def test_task_weights_one_smoothed_line_per_attack_type_and_the_uniform_line(tmp_path):
    fig = plot_task_weights(weighted_history(), tmp_path / "weights.png", smooth=2)
    assert (tmp_path / "weights.png").stat().st_size > 1000
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"uniform (1/T)", "fgsm", "l2", "pgd"}
    assert set(lines["uniform (1/T)"].get_ydata()) == {0.5}
    assert list(lines["pgd"].get_ydata()) == pytest.approx([0.8] * 19)  # 20 steps with pgd, smoothed over 2
    assert list(lines["l2"].get_xdata()) == list(range(4, 30, 3))  # from the second l2 step on
    # fgsm: 0.2 on steps 0, 3, ... and 0.5 (the mean of its two tasks) on steps 2, 5, ...
    assert lines["fgsm"].get_ydata()[0] == pytest.approx((0.2 + 0.5) / 2)
    assert ax.get_xlabel() == "meta-step" and ax.get_ylabel() == "task weight"
    colors = {line.get_label(): line.get_color() for line in training_curves(history()).axes[1].lines}
    assert all(lines[n].get_color() == colors[n] for n in colors)  # one color per type across figures


def test_task_weights_on_a_given_axes_and_errors():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_task_weights(weighted_history(), ax=ax) is fig
    assert len(ax.lines[1].get_xdata()) == 11  # fgsm: 20 steps, default window of 10
    with pytest.raises(ValueError, match="empty"):
        plot_task_weights([])
    with pytest.raises(ValueError, match=r"task_weights.*MetaConfig\(task_attention=True\)"):
        plot_task_weights(history())  # a run without task attention
    with pytest.raises(ValueError, match="one 'task_names' entry per 'task_weights' entry"):
        plot_task_weights([{"step": 0, "task_names": ["pgd"], "task_weights": [0.5, 0.5]}])


def test_no_pyplot_figures_are_left_open():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    robustness_bars(report())
    training_curves(history())
    plot_task_weights(weighted_history())
    assert plt.get_fignums() == before
    assert matplotlib.get_backend()  # any backend works: nothing here needs a display
