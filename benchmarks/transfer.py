"""Transfer matrix: how robust is a model trained against one attack family to every other family?

    python benchmarks/transfer.py --quick --families linf l2 spatial     # smoke: 2 steps per model, 32 digits
    python benchmarks/transfer.py --seeds 0 1 2 --device cuda             # the full matrix (too slow for 2 CPUs)
    python benchmarks/transfer.py --rows at_linf ramp meta_so             # a subset of the rows
    python benchmarks/transfer.py --seeds 0 --examples 200                # CPU-sized: one seed, 200 test digits

Rows: one model per single family (``at_<family>``: ``pgd_at`` on that family's training attack), then one
per multi-attack method of the protocol (``avg``, ``max``, ``msd``, ``sat``, ``ramp``, ``meta_so``), trained
on every family's training attack as ``heldout.py`` trains them (``msd`` on the Lp families only). Columns:
each family's evaluation attack, run white-box against the very model in eval mode, and their union (clean
and every attack). The UAR-style normalized score (Kang et al. 2019) divides each accuracy by that of the
model trained against the same family (the ``at_<family>`` row: the diagonal). One JSON per (row, seed)
goes to --out (a run whose JSON exists is skipped; --overwrite reruns it), then ``matrix.json`` (mean and
std over seeds), ``summary.md`` (both tables) and the heatmaps ``transfer.png`` / ``transfer_normalized.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from heldout import git_commit, hardware, load_data, positive_int, train, versions
from plots import plot_transfer

import metaadv as ma

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROTOCOL = ROOT / "benchmarks" / "protocols" / "transfer_mnist5k.yaml"
SINGLE = "at_"  # prefix of the single-family rows
QUICK = {"epochs": 1, "train_examples": 64, "batch_size": 32, "n_examples": 32, "eval_batch_size": 32,
         "meta": {"tasks_per_batch": 2, "support_size": 8, "query_size": 8, "inner_steps": 1,
                  "inner_lr": 0.01}}  # fmt: skip
QUICK_STEPS = 2  # quick mode caps every attack's ``steps`` at this


def _capped(spec: str, steps: int) -> str:
    attack = ma.attacks.make(spec)
    if "steps" in attack.params and attack.params["steps"] > steps:
        attack = attack.replace(steps=steps)
    return attack.spec


def load_protocol(path: Path, quick: bool = False, families: list[str] | None = None) -> dict[str, Any]:
    """The protocol YAML, cut to ``families`` (default: all) and, with ``quick``, to a smoke budget; every
    attack spec is checked before any training (canonical specs are stored)."""
    protocol = yaml.safe_load(path.read_text())
    fams = protocol["families"]
    unknown = sorted(set(families or ()) - set(fams))
    if unknown:
        raise ValueError(f"unknown families {unknown}; the protocol has {list(fams)}")
    fams = {f: fams[f] for f in families} if families else fams
    if quick:
        protocol = {**protocol, **QUICK}
    steps = QUICK_STEPS if quick else math.inf
    checked = {}
    for name, fam in fams.items():
        try:
            checked[name] = {k: _capped(fam[k], steps) for k in ("train", "eval")}
        except ValueError as e:
            raise ValueError(f"family {name!r}: {e} (run a subset with --families)") from e
    protocol["families"] = checked
    protocol.setdefault("eval_batch_size", 256)
    return protocol


def row_plan(protocol: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """Row name -> (training method, its training attacks): ``at_<family>`` rows, then the protocol's methods."""
    fams = protocol["families"]
    plan = {SINGLE + f: ("pgd_at", [fam["train"]]) for f, fam in fams.items()}
    for method in protocol["methods"]:
        specs = [fam["train"] for fam in fams.values()]
        if method == "msd":  # the union of Lp balls is MSD's threat model
            specs = [s for s in specs if ma.attacks.make(s).eps is not None]
        if specs:
            plan[method] = (method, specs)
    return plan


def run_one(row: str, protocol: dict[str, Any], seed: int, device: str, out: Path) -> dict[str, Any]:
    """Train the row's model, attack it with every family's evaluation attack, write ``<row>_seed<seed>.json``."""
    method, attacks = row_plan(protocol)[row]
    train_data, test = load_data(protocol)
    result = train(method, {**protocol, "pgd_at_attack": attacks[0], "train_attacks": attacks}, train_data, seed,
                   device)  # fmt: skip
    t_eval = time.perf_counter()
    fams = protocol["families"]
    report = ma.evaluate(result.model, test, [f["eval"] for f in fams.values()], n_examples=protocol["n_examples"],
                         seed=seed, batch_size=protocol["eval_batch_size"])  # fmt: skip
    record = {
        "protocol": protocol["name"], "row": row, "method": method, "trained_on": attacks, "seed": seed,
        "acc": {f: report.per_attack[fam["eval"]] for f, fam in fams.items()}, "union_acc": report.union_acc,
        "clean_acc": report.clean_acc, "report": report.to_dict(), "train_seconds": result.seconds,
        "eval_seconds": time.perf_counter() - t_eval,
        "history": [{k: r[k] for k in ("step", "loss", "seconds") if k in r} for r in result.history],
        "config": protocol, "versions": versions(), "git_commit": git_commit(), "hardware": hardware(result.model),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{row}_seed{seed}.json").write_text(json.dumps(record, indent=1))
    return record


def build_matrix(records: list[dict[str, Any]], rows: list[str], families: list[str]) -> dict[str, Any]:
    """Accuracy in [0, 1], mean and std over seeds, rows x (families + union); the normalized score per
    family (``None`` where the diagonal row is missing or 0) and its mean per row (UAR-style)."""
    columns = [*families, "union"]
    by_row = {r: [rec for rec in records if rec["row"] == r] for r in rows}
    missing = [r for r, recs in by_row.items() if not recs]
    if missing:
        raise ValueError(f"no results for rows {missing}")
    sizes = {rec["config"]["n_examples"] for rec in records}
    if len(sizes) > 1:
        raise ValueError(f"the runs were evaluated on different numbers of test digits {sorted(sizes)}: one matrix "
                         "needs one --examples (rerun with --overwrite, or write to another --out)")  # fmt: skip

    def values(r: str, col: str) -> list[float]:
        return [rec["union_acc"] if col == "union" else rec["acc"][col] for rec in by_row[r]]

    acc = [[statistics.mean(values(r, c)) for c in columns] for r in rows]
    std = [[statistics.stdev(v) if len(v := values(r, c)) > 1 else 0.0 for c in columns] for r in rows]
    diagonal = {f: acc[rows.index(SINGLE + f)][j] if SINGLE + f in rows else None for j, f in enumerate(families)}
    normalized = [[a / diagonal[f] if diagonal[f] else None for a, f in zip(row, families, strict=False)]
                  for row in acc]  # fmt: skip
    defined = [[v for v in row if v is not None] for row in normalized]
    return {
        "rows": rows, "columns": columns, "acc": acc, "std": std,
        "clean": [statistics.mean(rec["clean_acc"] for rec in by_row[r]) for r in rows],
        "normalized_columns": families, "normalized": normalized,
        "normalized_mean": [statistics.mean(v) if v else None for v in defined],
        "seeds": sorted({rec["seed"] for rec in records}), "eval_attacks": records[0]["config"]["families"],
    }  # fmt: skip


def summarize(matrix: dict[str, Any]) -> str:
    """Markdown: the accuracy table (%, mean ± std over seeds) and the normalized table."""

    def cell(v: float | None, s: float = 0.0, scale: float = 100, digits: int = 1) -> str:
        if v is None:
            return "–"
        return f"{scale * v:.{digits}f}" + (f" ± {scale * s:.{digits}f}" if s else "")

    head = ["trained on \\ attacked by", "clean", *matrix["columns"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(matrix["rows"]):
        cells = [cell(v, s) for v, s in zip(matrix["acc"][i], matrix["std"][i], strict=True)]
        lines.append(f"| {row} | {cell(matrix['clean'][i])} | " + " | ".join(cells) + " |")
    head = ["trained on \\ attacked by", *matrix["normalized_columns"], "mean"]
    lines += ["", "Normalized: accuracy / accuracy of the model trained against that family (the diagonal).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(matrix["rows"]):
        cells = [cell(v, scale=1, digits=2) for v in [*matrix["normalized"][i], matrix["normalized_mean"][i]]]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    attacks = ", ".join(f"{f}: `{a['eval']}`" for f, a in matrix["eval_attacks"].items())
    lines += ["", f"Accuracy (%) on the evaluation attacks ({attacks}); seeds {matrix['seeds']}."]
    return "\n".join(lines)


def run_all(protocol: dict[str, Any], seeds: list[int], rows: list[str] | None, device: str, out: Path,
            overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train and evaluate every (row, seed) not already in ``out``, then write matrix.json, summary.md and the
    heatmaps; returns the matrix (see :func:`build_matrix`)."""
    plan = row_plan(protocol)
    rows = rows or list(plan)
    unknown = sorted(set(rows) - set(plan))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; this protocol has {list(plan)}")
    runs = [(s, r) for s in seeds for r in rows if overwrite or not (out / f"{r}_seed{s}.json").exists()]
    if len(runs) < len(seeds) * len(rows):
        print(f"{len(seeds) * len(rows) - len(runs)} runs already in {out}: skipped (--overwrite reruns them)")
    start = time.perf_counter()
    for i, (seed, row) in enumerate(runs, 1):
        rec = run_one(row, protocol, seed, device, out)
        print(f"[{time.perf_counter() - start:7.0f}s] {i}/{len(runs)} {row} seed {seed} ({rec['method']} on "
              f"{len(rec['trained_on'])} attack(s)): union {rec['union_acc']:.1%}, clean {rec['clean_acc']:.1%}, "
              f"train {rec['train_seconds']:.0f}s", flush=True)  # fmt: skip
    records = [json.loads((out / f"{r}_seed{s}.json").read_text()) for s in seeds for r in rows]
    matrix = build_matrix(records, rows, list(protocol["families"]))
    (out / "matrix.json").write_text(json.dumps(matrix, indent=1))
    (out / "summary.md").write_text(f"# {protocol['name']}: transfer matrix\n\n{summarize(matrix)}\n")
    plot_transfer(matrix, out, protocol["name"])
    return matrix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", type=Path, default=DEFAULT_PROTOCOL, help="a YAML protocol with `families`")
    p.add_argument(
        "--quick", action="store_true", help="2 training steps per model, attacks capped at 2 steps, 32 digits"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--families", nargs="+", help="subset of the protocol's families (columns and at_ rows)")
    p.add_argument("--rows", nargs="+", help="subset of the rows (at_<family>, or a method of the protocol)")
    p.add_argument("--data", help="override the protocol's dataset (e.g. mnist, with torchvision)")
    p.add_argument("--examples", type=positive_int, help="override the protocol's n_examples (test digits per column)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/<protocol>[_quick]")
    p.add_argument("--overwrite", action="store_true", help="rerun runs whose JSON already exists")
    args = p.parse_args()
    protocol = load_protocol(args.protocol, args.quick, args.families)
    if args.data:
        protocol["data"] = args.data
    if args.examples is not None:
        protocol["n_examples"] = args.examples
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    out = args.out or ROOT / "benchmarks" / "results" / (protocol["name"] + ("_quick" if args.quick else ""))
    matrix = run_all(protocol, seeds, args.rows, args.device, out, args.overwrite)
    print(
        f"\n{summarize(matrix)}\n\nwrote {out}/*.json, matrix.json, summary.md, transfer.png, transfer_normalized.png"
    )


if __name__ == "__main__":
    sys.exit(main())
