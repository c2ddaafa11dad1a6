"""Several models' reports side by side: one row per model (clean, each attack, the union, the union after each
adaptation) and one sentence saying what the table shows."""

from __future__ import annotations

import math
from collections.abc import Mapping

from .report import RobustnessReport

__all__ = ["comparison_summary", "comparison_table"]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _check_comparable(reports: Mapping[str, RobustnessReport]) -> RobustnessReport:
    if not reports:
        raise ValueError("nothing to compare: give at least one report")
    first = next(iter(reports.values()))
    for name, r in reports.items():
        if (r.attacks, r.n_examples, r.adapt_shots, list(r.adapted)) != (
            first.attacks, first.n_examples, first.adapt_shots, list(first.adapted)
        ):  # fmt: skip
            raise ValueError(
                f"report {name!r} was measured on other attacks, examples or adaptations than the first: "
                "compare reports of one evaluation setting"
            )
    return first


def comparison_table(reports: Mapping[str, RobustnessReport], seconds: Mapping[str, float] | None = None) -> str:
    """A markdown table in percent: a row per model (name -> its report, all of one evaluation setting), columns
    clean, each attack (zero-shot), union, then the union after each adaptation method; ``seconds``: each model's
    training wall-clock, as a last column."""
    first = _check_comparable(reports)
    adapted = [f"union {m}@{first.adapt_shots}" for m in first.adapted]
    header = ["model", "clean", *(f"`{s.split('(')[0]}`" for s in first.attacks), "union", *adapted]
    header += ["train s"] if seconds else []
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, r in reports.items():
        row = [name, _pct(r.clean_acc), *(_pct(r.per_attack[s]) for s in r.attacks), _pct(r.union_acc)]
        row += [_pct(r.adapted_union.get(m)) for m in first.adapted]
        row += [f"{seconds[name]:.0f}"] if seconds else []
        lines.append("| " + " | ".join(row) + " |")
    attacks = "; ".join(f"`{s}`" for s in first.attacks)
    lines.append(f"\nAccuracy (%) on the same {first.n_examples} test examples, every attack run white-box against the "
                 f"model in the row (after adaptation: against the adapted model). Attacks: {attacks}.")  # fmt: skip
    return "\n".join(lines)


def comparison_summary(reports: Mapping[str, RobustnessReport]) -> str:
    """One paragraph: the models ranked by union accuracy (robust to every attack at once), zero-shot and after
    their best adaptation, and whether the differences exceed the sampling noise of the evaluation set (two
    standard errors of the leader's accuracy, sqrt(p (1 - p) / n)), so that a tie is said as a tie."""
    first = _check_comparable(reports)
    n = first.n_examples

    def ranked(score: Mapping[str, float]) -> str:
        order = sorted(score, key=score.__getitem__, reverse=True)
        top = score[order[0]]
        noise = 2 * math.sqrt(top * (1 - top) / n)
        listing = ", ".join(f"{name} {_pct(score[name])}%" for name in order)
        if len(order) == 1:
            return listing
        spread = top - min(score.values())
        verdict = "within sampling noise: a tie" if spread < noise else f"{order[0]} leads beyond sampling noise"
        return f"{listing} ({verdict}; two standard errors are {_pct(noise)} points on {n} examples)"

    zero_shot = {k: r.union_acc for k, r in reports.items()}
    text = f"Union accuracy (robust to every attack at once), zero-shot: {ranked(zero_shot)}"
    if first.adapted:
        after = {k: max(r.adapted_union.values()) for k, r in reports.items()}
        text += f"; after each model's best {first.adapt_shots}-shot adaptation: {ranked(after)}"
    return text + "."
