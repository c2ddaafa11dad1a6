"""Regenerate every benchmark figure from the JSON results, and nothing else.

    python benchmarks/plots.py                                    # all result folders -> docs/figures/
    python benchmarks/plots.py benchmarks/results/linf_heldout --out docs/figures

Figures per protocol folder: held-out accuracy per attack per method (grouped bars), robust accuracy vs
eps, held-out union vs training wall-clock, few-shot adaptation (union vs shots, fine-tuning and
test-time BN), where meta methods ran their own inner loop their ``matched`` curves beside every method's
best common adaptation, and meta-training curves. Method colors are fixed across all figures. A transfer-matrix
folder (``benchmarks/transfer.py``, with a ``matrix.json``) gets its two heatmaps instead. Learning curves
(``benchmarks/learning_curves.py``'s JSON, per protocol and seed) get one figure each.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from report import run_score

import metaadv as ma

ROOT = Path(__file__).resolve().parents[1]
COLORS = {  # one color per method, the same in every figure
    "erm": "#7f7f7f", "pgd_at": "#1f77b4", "fast_at": "#17becf", "trades": "#9467bd", "avg": "#2ca02c",
    "max": "#bcbd22", "msd": "#8c564b", "sat": "#e377c2", "meta_fo": "#ff7f0e", "meta_so": "#d62728",
    "meta_anil": "#ff9896", "meta_anneal": "#ffbb78", "meta_sgd": "#c49c94", "ramp": "#393b79",
    "meta_attention": "#e7969c", "meta_reuse4": "#843c39", "meta_task_bn": "#637939", "ramp_lambda1": "#9c9ede",
    "meta_consistency_small": "#6b6ecf", "meta_bn_inner": "#bd9e39",
}  # fmt: skip
WIDTH = (7.5, 3.6)


def load(folder: Path) -> dict[str, list[dict]]:
    """method -> its runs (ordered by seed), methods in the protocol's order."""
    runs: dict[str, list[dict]] = defaultdict(list)
    records = [json.loads(path.read_text()) for path in sorted(folder.glob("*_seed*.json"))]
    for record in sorted(records, key=lambda r: r["seed"]):
        runs[record["method"]].append(record)
    order = records[0]["config"]["methods"] if records else []
    return dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def mean_std(values: list[float]) -> tuple[float, float]:
    return 100 * statistics.mean(values), 100 * statistics.stdev(values) if len(values) > 1 else 0.0


def short(spec: str) -> str:
    name, _, rest = spec.partition("(")
    eps = [kv for kv in rest.rstrip(")").split(", ") if kv.startswith("eps=")]
    return f"{name.replace('torchattacks:', 'ta:')}\n{eps[0] if eps else ''}"


SCORES = {"union": "held-out union accuracy (%)", "mean": "mean accuracy over held-out attacks (%)"}


def score(result: dict, kind: str, how: str | None = None) -> float:
    """One evaluation's held-out score: the union, or the mean over attacks (with many held-out families
    the union can be ~0 for every method while the mean still ranks them). ``how`` picks an adaptation."""
    if kind == "union":
        return result["union_acc"] if how is None else result["adapted_union"][how]
    per_attack = result["per_attack"] if how is None else result["adapted"][how]
    return statistics.mean(per_attack.values())


def heldout_bars(runs: dict[str, list[dict]], ax: plt.Axes) -> None:
    attacks = next(iter(runs.values()))[0]["heldout"]["attacks"]
    groups = ["clean", *attacks, "mean", "union"]
    width = 0.8 / len(runs)
    for i, (method, rs) in enumerate(runs.items()):
        vals = [[r["heldout"]["clean_acc"] for r in rs]]
        vals += [[r["heldout"]["per_attack"][a] for r in rs] for a in attacks]
        vals += [[score(r["heldout"], kind) for r in rs] for kind in ("mean", "union")]
        stats = [mean_std(v) for v in vals]
        xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], color=COLORS.get(method), label=method,
               capsize=1.5)  # fmt: skip
    ax.set_xticks(range(len(groups)), ["clean", *map(short, attacks), "mean", "union"], fontsize=6)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=6, ncol=min(len(runs), 5))


def eps_curves(runs: dict[str, list[dict]], fig: plt.Figure) -> None:
    families = list(next(iter(runs.values()))[0]["sanity"]["eps_sweep"])
    axes = fig.subplots(1, max(1, len(families)), squeeze=False)[0]
    for ax, family in zip(axes, families, strict=False):
        for method, rs in runs.items():
            eps = rs[0]["sanity"]["eps_sweep"][family]["eps"]
            stats = [mean_std([r["sanity"]["eps_sweep"][family]["acc"][j] for r in rs]) for j in range(len(eps))]
            ax.errorbar(eps, [m for m, _ in stats], [s for _, s in stats], color=COLORS.get(method), label=method,
                        marker="o", ms=3)  # fmt: skip
        ax.set_xlabel(f"eps ({family}, [0,1] pixel scale)")
        ax.set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=6)


def cost_benefit(runs: dict[str, list[dict]], fig: plt.Figure) -> None:
    for ax, kind in zip(fig.subplots(1, 2), SCORES, strict=True):
        for method, rs in runs.items():
            t = [r["train_seconds"] for r in rs]
            m, s = mean_std([score(r["heldout"], kind) for r in rs])
            ax.errorbar(statistics.mean(t), m, yerr=s, xerr=statistics.stdev(t) if len(t) > 1 else 0, fmt="o",
                        color=COLORS.get(method), label=method)  # fmt: skip
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel(SCORES[kind], fontsize=7)
    fig.axes[0].legend(fontsize=6)


def few_shot(runs: dict[str, list[dict]], fig: plt.Figure) -> None:
    axes = fig.subplots(2, 2, sharey="row")
    for row, kind in zip(axes, SCORES, strict=True):
        for ax, how in zip(row, ("sgd", "bn"), strict=True):
            for method, rs in runs.items():
                shots = sorted(int(s) for s in rs[0]["adapted"])
                stats = [mean_std([score(r["heldout"], kind) for r in rs])]
                stats += [mean_std([score(r["adapted"][str(s)], kind, how) for r in rs]) for s in shots]
                ax.errorbar([0, *shots], [m for m, _ in stats], [s for _, s in stats], color=COLORS.get(method),
                            label=method, marker="o", ms=3)  # fmt: skip
            ax.set_title({"sgd": "fine-tuning (SGD)", "bn": "test-time BN statistics"}[how], fontsize=8)
        row[0].set_ylabel(SCORES[kind], fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("adaptation shots (0 = zero-shot)")
    axes[0][0].legend(fontsize=6)


def heatmap(ax: plt.Axes, values: list[list[float | None]], rows: list[str], columns: list[str], *,
            fmt: str, vmax: float, cmap: str = "viridis") -> None:  # fmt: skip
    """A rows x columns heatmap with each value printed in its cell ("–" and no color where a value is None)."""
    grid = [[math.nan if v is None else v for v in row] for row in values]
    image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            dark = not math.isnan(v) and v < 0.6 * vmax  # light text on the dark end of viridis
            ax.text(j, i, "–" if math.isnan(v) else fmt.format(v), ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(len(columns)), columns, fontsize=7, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("attacked by (white-box, eval mode)")
    ax.set_ylabel("trained on")
    ax.figure.colorbar(image, ax=ax, fraction=0.04)


def plot_transfer(matrix: dict, out: Path, name: str, prefix: str = "") -> list[Path]:
    """The transfer matrix of ``benchmarks/transfer.py`` (``matrix.json``) as two heatmaps in ``out``:
    ``<prefix>transfer.png`` (accuracy %, rows = training method, columns = families + union) and
    ``<prefix>transfer_normalized.png`` (accuracy / the diagonal's, UAR-style, with each row's mean)."""
    out.mkdir(parents=True, exist_ok=True)
    size = (1.2 + 0.75 * len(matrix["columns"]), 1.0 + 0.35 * len(matrix["rows"]))
    pct = [[100 * v for v in row] for row in matrix["acc"]]
    normalized = [[*row, m] for row, m in zip(matrix["normalized"], matrix["normalized_mean"], strict=True)]
    finite = [v for row in normalized for v in row if v is not None]
    figures = [
        ("transfer", pct, matrix["columns"], "{:.0f}", 100.0, "accuracy (%)"),
        ("transfer_normalized", normalized, [*matrix["normalized_columns"], "mean"], "{:.2f}",
         max([1.0, *finite]), "accuracy / accuracy of the model trained on that family"),
    ]  # fmt: skip
    written = []
    for kind, values, columns, fmt, vmax, title in figures:
        fig, ax = plt.subplots(figsize=size)
        heatmap(ax, values, matrix["rows"], columns, fmt=fmt, vmax=vmax)
        ax.set_title(f"{name}: {title}, seeds {matrix['seeds']}", fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}{kind}.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    return written


def adaptation_curves(runs: dict[str, list[dict]], fig: plt.Figure) -> None:
    """docs/adaptation.md's question as curves, per score (union, mean): every method's best common adaptation
    (``best@s``, solid) and each meta method's own inner loop (``matched``, dashed) against the shots. ERM, the
    floor, is left to the few-shot figure so that the axis resolves the robust methods."""
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, SCORES, strict=True):
        for method, rs in ((m, rs) for m, rs in runs.items() if m != "erm"):
            shots = [0, *sorted(int(s) for s in rs[0]["adapted"])]
            for how, style in (("best", "-"), ("matched", "--")):
                got = [[run_score(r, s, how, kind) for r in rs] for s in shots]
                if any(x is None for at in got for x in at):
                    continue
                stats = [mean_std(at) for at in got]
                ax.errorbar(shots, [m for m, _ in stats], [s for _, s in stats], color=COLORS.get(method),
                            ls=style, label=method if how == "best" else None, marker="o", ms=3)  # fmt: skip
        ax.set(xlabel="adaptation shots (0 = zero-shot)", ylabel=SCORES[kind])
        ax.yaxis.label.set_size(7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)


def plot_folder(folder: Path, out: Path) -> list[Path]:
    if (folder / "matrix.json").exists():  # a transfer matrix (benchmarks/transfer.py)
        return plot_transfer(json.loads((folder / "matrix.json").read_text()), out, folder.name, f"{folder.name}_")
    runs = load(folder)
    if not runs:
        return []
    out.mkdir(parents=True, exist_ok=True)
    name = folder.name
    written = []

    def save(fig: plt.Figure, kind: str, title: str) -> None:
        fig.suptitle(f"{name}: {title}", fontsize=9)
        fig.tight_layout()
        path = out / f"{name}_{kind}.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=WIDTH)
    heldout_bars(runs, ax)
    save(fig, "heldout", "accuracy under held-out attacks (mean ± std over seeds)")
    if next(iter(runs.values()))[0]["sanity"]["eps_sweep"]:
        fig = plt.figure(figsize=WIDTH)
        eps_curves(runs, fig)
        save(fig, "eps", "robust accuracy vs eps (white-box PGD-20)")
    fig = plt.figure(figsize=WIDTH)
    cost_benefit(runs, fig)
    save(fig, "cost", "held-out accuracy vs training time")
    fig = plt.figure(figsize=(WIDTH[0], 1.6 * WIDTH[1]))
    few_shot(runs, fig)
    save(fig, "fewshot", "few-shot adaptation to held-out attacks (attack re-run on the adapted model)")
    if any("matched" in at["adapted_union"] for rs in runs.values() for r in rs for at in r["adapted"].values()):
        fig = plt.figure(figsize=WIDTH)
        adaptation_curves(runs, fig)
        save(fig, "adaptation", "best common adaptation (solid) vs meta methods' own inner loop (dashed)")
    for method in ("meta_so", "meta_fo"):
        if method in runs:
            fig = ma.plots.training_curves(runs[method][0]["history"])
            save(fig, f"{method}_training", f"{method} meta-training (seed {runs[method][0]['seed']})")
    return written


def plot_learning_curves(files: list[Path], out: Path, name: str) -> Path:
    """One figure of ``benchmarks/learning_curves.py``'s JSON ``files`` (method -> points per epoch): the
    held-out and the training-attack mean accuracy after every epoch, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=WIDTH, sharey=True)
    for path in files:
        for method, points in json.loads(path.read_text()).items():
            epochs = [p["epoch"] for p in points]
            for ax, kind in zip(axes, ("heldout", "train"), strict=True):
                ax.plot(epochs, [p[kind]["mean"] for p in points], label=method, color=COLORS.get(method))
    for ax, title in zip(axes, ("held-out attacks", "training attacks"), strict=True):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean robust accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{name}: zero-shot accuracy after every epoch", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=120)
    plt.close(fig)
    return out / f"{name}.png"


def learning_curve_files(results: Path) -> dict[str, list[Path]]:
    """``learning_curves_<protocol>_seed<k>[_<method>].json`` in ``results``, grouped by protocol and seed."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(results.glob("learning_curves_*.json")):
        match = re.match(r"(learning_curves_.+_seed\d+)", path.stem)
        if match:
            groups[match.group(1)].append(path)
    return dict(groups)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", type=Path, help="result folders (default: benchmarks/results/*/)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args()
    folders = args.folders or sorted(d for d in (ROOT / "benchmarks" / "results").iterdir() if d.is_dir())
    for folder in folders:
        for path in plot_folder(folder, args.out):
            print(f"wrote {path}")
    if not args.folders:
        for name, files in learning_curve_files(ROOT / "benchmarks" / "results").items():
            print(f"wrote {plot_learning_curves(files, args.out, name)}")


if __name__ == "__main__":
    main()
