"""The adaptation question, answered from the converged runs (docs/adaptation.md): does a meta-trained
variant, adapted with its own inner loop ("matched"), beat the best baseline with its best adaptation?

    python benchmarks/verdict.py                                        # every benchmarks/results/converged_*
    python benchmarks/verdict.py benchmarks/results/converged_leave_out_l2
    python benchmarks/verdict.py --out benchmarks/results/verdict.md        # the committed tables

Each folder gets two tables: every method's scores (mean ± std over seeds; docs/adaptation.md's results tables)
and the leads below.
Per protocol, shot count and score (held-out union, held-out mean): the best baseline is the baseline method
with the highest mean over seeds of its best adaptation (``best@s``: the best of sgd, bn, bn_mix, bn_sgd, as in
heldout.py's summary); zero-shot, of its held-out score. Each meta method's lead over it is taken seed by seed
(same seed, same test digits), in points; a baseline competes once it has run every seed the meta method ran. A
meta method "wins" a row when it leads by at least ``--margin`` points on every seed. Training time is the meta
method's over the best baseline's (mean over seeds).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from heldout import ROOT, is_meta
from report import SCORES, load_records, mean_std, run_score

__all__ = ["answer", "leads", "results_table", "verdict_table"]
VERDICT = ROOT / "benchmarks" / "results" / "verdict.md"  # every converged folder's tables, as committed
HEADER = "# The adaptation verdict (written by `python benchmarks/verdict.py --out benchmarks/results/verdict.md`)\n"


def by_seed(records: list[dict[str, Any]], method: str, shots: int, how: str, kind: str) -> dict[int, float]:
    got = {r["seed"]: run_score(r, shots, how, kind) for r in records if r["method"] == method}
    return {seed: value for seed, value in got.items() if value is not None}


def leads(records: list[dict[str, Any]], shots: int, kind: str) -> list[dict[str, Any]]:
    """One entry per meta method: the best baseline (name, its scores by seed), the meta method's matched scores
    by seed (zero-shot at ``shots`` 0) and its lead over the baseline per seed, in points. A baseline competes
    only once it has run every seed the meta method ran, so a partial run never decides a row."""
    meta = {r["method"]: is_meta(r["method"], r["config"]) for r in records}
    baselines, metas = [m for m, is_it in meta.items() if not is_it], [m for m, is_it in meta.items() if is_it]
    scored = {b: by_seed(records, b, shots, "best", kind) for b in baselines}
    out = []
    for method in metas:
        own = by_seed(records, method, shots, "matched", kind)
        complete = {b: s for b, s in scored.items() if own.keys() <= s.keys()}
        if not own or not complete:
            continue
        best = max(complete, key=lambda b: statistics.mean(complete[b].values()))
        out.append({"method": method, "baseline": best, "baseline_scores": complete[best], "scores": own,
                    "leads": {s: 100 * (own[s] - complete[best][s]) for s in sorted(own)},
                    "time_ratio": train_time(records, method) / train_time(records, best)})  # fmt: skip
    return out


def train_time(records: list[dict[str, Any]], method: str) -> float:
    return statistics.mean(r["train_seconds"] for r in records if r["method"] == method)


def results_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per method, in %, mean ± std over seeds: clean, held-out union / mean zero-shot, the
    reference attacks' union (AutoAttack; zero-shot), best and matched at every shot count, training seconds."""
    shots = sorted({int(s) for r in records for s in r["adapted"]})
    head = ["method", "seeds", "clean", "zero-shot", "reference", *[f"{h}@{s}" for s in shots for h in
            ("best", "matched")], "train (s)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]
        ref = [r["reference"]["union_acc"] for r in rs if r.get("reference")]
        row = [f"`{method}`", str(len(rs)), mean_std([r["heldout"]["clean_acc"] for r in rs]),
               pair(rs, 0, "best"), mean_std(ref) if ref else "–"]  # fmt: skip
        row += [pair(rs, s, how) for s in shots for how in ("best", "matched")]
        row.append(mean_std([r["train_seconds"] for r in rs], 1.0, 0))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pair(records: list[dict[str, Any]], shots: int, how: str) -> str:
    """``"union / mean"`` (each mean ± std over the runs, in %) of adaptation ``how``; "–" where none ran."""
    got = [(u, m) for r in records if (u := run_score(r, shots, how, "union")) is not None
           and (m := run_score(r, shots, how, "mean")) is not None]  # fmt: skip
    return f"{mean_std([u for u, _ in got])} / {mean_std([m for _, m in got])}" if got else "–"


def verdict_table(records: list[dict[str, Any]], margin: float = 3.0) -> str:
    """Markdown: one row per (shots, score, meta method), accuracies in %, leads in points."""
    shots = [0, *sorted({int(s) for r in records for s in r["adapted"]})]
    head = ["shots", "score", "best baseline (its best adaptation)", "meta method (matched)", "lead per seed",
            "mean lead", f"wins (≥{margin:g} on every seed)", "train time / baseline's"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in shots:
        for kind in SCORES:
            for row in leads(records, s, kind):
                lead = list(row["leads"].values())
                lines.append("| " + " | ".join([
                    "zero-shot" if s == 0 else str(s), kind,
                    f"{row['baseline']} {mean_std(list(row['baseline_scores'].values()))}",
                    f"{row['method']} {mean_std(list(row['scores'].values()))}",
                    ", ".join(f"{v:+.1f}" for v in lead), mean_std(lead, 1.0),
                    "yes" if min(lead) >= margin else "no", f"{row['time_ratio']:.2f}x",
                ]) + " |")  # fmt: skip
    seeds = sorted({r["seed"] for r in records})
    ran: dict[str, list[int]] = {}
    for r in records:
        ran.setdefault(r["method"], []).append(r["seed"])
    partial = ", ".join(f"{m} (seeds {sorted(s)})" for m, s in ran.items() if len(s) < len(seeds))
    note = f" Missing seeds (a baseline competes once it covers the meta method's): {partial}." if partial else ""
    summary = f"{len(records)} runs, seeds {seeds}; zero-shot rows compare held-out scores.{note}"
    return "\n".join([*lines, "", summary])


def answer(folders: list[Path], margin: float = 3.0) -> str:
    """Markdown: per results folder with runs, its name, ``results_table`` and ``verdict_table``."""
    parts = []
    for folder in folders:
        records = load_records(folder)
        if records:
            parts.append(f"## {folder.name}\n\n{results_table(records)}\n\n{verdict_table(records, margin)}\n")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="*", help="default: every benchmarks/results/converged_* folder")
    p.add_argument("--margin", type=float, default=3.0, help="the lead in points a win needs on every seed")
    p.add_argument("--out", type=Path, help=f"also write the tables there (docs/adaptation.md's: {VERDICT})")
    args = p.parse_args()
    text = answer(args.folders or converged_folders(), args.margin)
    print(text)
    if args.out:
        args.out.write_text(f"{HEADER}\n{text}")
        print(f"wrote {args.out}")


def converged_folders() -> list[Path]:
    return sorted((ROOT / "benchmarks" / "results").glob("converged_*"))


if __name__ == "__main__":
    main()
