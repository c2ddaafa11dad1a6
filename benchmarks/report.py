"""The held-out benchmark's report: the markdown summary of every run's JSON in a results folder, and the
helpers the verdict (benchmarks/verdict.py) reads runs with. ``heldout.py`` writes it after its runs;

    python benchmarks/report.py benchmarks/results/converged_leave_out_l2   # rewrite summary.md from the JSONs

rewrites it after runs made with ``--no-summary`` or in several parts.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

__all__ = [
    "COMMON", "SCORES", "adapted_scores", "inner_loop_gain", "load_records", "mean_std", "run_score", "summarize",
    "summary_markdown", "write_summary",
]  # fmt: skip
COMMON = ("sgd", "bn", "bn_mix", "bn_sgd")  # the adaptations every method gets; "best" is the best of them
SCORES = ("union", "mean")  # a run's held-out scores: robust to every attack at once, the mean over attacks


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` of ``values`` times ``scale`` (fractions to %), ``digits`` decimals; the mean alone for
    one value."""
    m = scale * statistics.mean(values)
    return f"{m:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def summarize(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per method, mean ± std over seeds (accuracy in %, time in seconds).

    "held-out mean" averages the per-attack accuracies: with many held-out families the union (robust to
    every one at once) can be ~0 for every method, and the mean still ranks them. "best@s" is, per run, the
    best of the adaptations every method gets (``COMMON``; union and mean each maximized on the test digits, so
    optimistic alike for every method); "matched@s", a meta method's own inner loop, stays outside it.
    "inner-loop gain": runs that log the adaptation gap, its mean over the last fifth of training. "reference":
    zero-shot under the protocol's ``reference_attacks`` (AutoAttack, ...) on the same test digits.
    """
    methods = list(dict.fromkeys(r["method"] for r in records))
    shots = sorted({int(s) for r in records for s in r["adapted"]})
    attacks = records[0]["heldout"]["attacks"]
    head = ["method", "clean", *[f"`{a}`" for a in attacks], "**held-out union**", "held-out mean"]
    refs = list(dict.fromkeys(a for r in records for a in r.get("reference", {}).get("attacks", [])))
    head += [*(f"reference `{a}`" for a in refs), *(["reference union"] if refs else []), "train-attack union"]
    ran = {m for r in records for a in r["adapted"].values() for m in a["adapted_union"]}
    how = [m for m in (*COMMON, "task_bn") if m in ran] + (["best"] if ran & set(COMMON) else [])
    how += ["matched"] if "matched" in ran else []
    head += [f"{kind} {m}@{s}" for s in shots for m in how for kind in ("union", "mean")] + ["train time (s)"]
    gaps = any(inner_loop_gain(r) is not None for r in records)
    head += ["inner-loop gain (points)"] if gaps else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        rs = [r for r in records if r["method"] == method]
        row = [method, mean_std([r["heldout"]["clean_acc"] for r in rs])]
        row += [mean_std([r["heldout"]["per_attack"][a] for r in rs]) for a in attacks]
        row += [f"**{mean_std([r['heldout']['union_acc'] for r in rs])}**"]
        row += [mean_std([statistics.mean(r["heldout"]["per_attack"].values()) for r in rs])]
        ref = [r["reference"] for r in rs if "reference" in r]
        for got in [[x["per_attack"][a] for x in ref if a in x["per_attack"]] for a in refs]:
            row.append(mean_std(got) if got else "–")
        row += [(mean_std([x["union_acc"] for x in ref]) if ref else "–")] if refs else []
        row += [mean_std([r["train_attacks"]["union_acc"] for r in rs])]
        for s in shots:
            for m in how:
                scores = [x for r in rs if (x := adapted_scores(r["adapted"].get(str(s), {}), m)) is not None]
                row += [mean_std([x[i] for x in scores]) if scores else "–" for i in (0, 1)]
        row.append(mean_std([r["train_seconds"] for r in rs], 1.0, 0))
        if gaps:
            gain = [g for r in rs if (g := inner_loop_gain(r)) is not None]
            row.append(mean_std(gain) if gain else "–")
        lines.append("| " + " | ".join(row) + " |")
    warnings = [f"- {r['method']} seed {r['seed']}: {w}" for r in records for w in r["sanity"]["warnings"]]
    lines += ["", f"{len(records)} runs, seeds {sorted({r['seed'] for r in records})}."]
    lines += ["", "Sanity checks: " + ("all passed." if not warnings else "warnings:"), *warnings]
    return "\n".join(lines)


def inner_loop_gain(record: dict[str, Any]) -> float | None:
    """A meta run's adaptation gap over the last fifth of its steps (``MetaConfig.log_adaptation_gap``): the
    adapted copies' query accuracy minus theta's on the same examples, in [-1, 1]; None if not logged."""
    gaps = [statistics.mean(h["adaptation_gap"]) for h in record.get("history", []) if "adaptation_gap" in h]
    return statistics.mean(gaps[-max(1, len(gaps) // 5) :]) if gaps else None


def adapted_scores(at_shots: dict[str, Any], how: str) -> tuple[float, float] | None:
    """(union, mean over attacks) of adaptation ``how`` in a run's entry for one shot count (None: it did not
    run); ``"best"``: each the best over the common adaptations that ran."""
    union, per_attack = at_shots.get("adapted_union", {}), at_shots.get("adapted", {})
    names = [m for m in COMMON if m in union] if how == "best" else [how] if how in union else []
    if not names:
        return None
    return max(union[m] for m in names), max(statistics.mean(per_attack[m].values()) for m in names)


def run_score(record: dict[str, Any], shots: int, how: str, kind: str) -> float | None:
    """A run's held-out ``kind`` ("union" or "mean", in [0, 1]): zero-shot at ``shots`` 0, else adaptation
    ``how`` ("best", "matched", ...) at ``shots``; None where it did not run."""
    if shots == 0:
        heldout = record["heldout"]
        return heldout["union_acc"] if kind == "union" else statistics.mean(heldout["per_attack"].values())
    scores = adapted_scores(record["adapted"].get(str(shots), {}), how)
    return None if scores is None else scores[SCORES.index(kind)]


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every run's JSON in ``out``, ordered by seed, then method."""
    records = [json.loads(f.read_text()) for f in sorted(out.glob("*_seed*.json"))]
    return sorted(records, key=lambda r: (r["seed"], r["config"]["methods"].index(r["method"])
                                          if r["method"] in r["config"]["methods"] else 99))  # fmt: skip


def summary_markdown(records: list[dict[str, Any]]) -> str:
    """``summary.md``'s text for ``records``: the protocol's name over ``summarize``'s table."""
    return f"# {records[0]['protocol']}\n\n{summarize(records)}\n"


def write_summary(out: Path) -> str:
    """Summarize every run's JSON in ``out`` into ``out/summary.md`` (``summary_markdown``); its text."""
    records = load_records(out)
    if not records:
        raise FileNotFoundError(f"no run JSON (<method>_seed<s>.json) in {out}")
    text = summary_markdown(records)
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a results folder (benchmarks/results/<protocol>)")
    args = p.parse_args()
    print(f"{write_summary(args.folder)}\nwrote {args.folder}/summary.md")


if __name__ == "__main__":
    main()
