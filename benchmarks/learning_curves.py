"""Learning curves: held-out and training-attack accuracy after every epoch, to choose a converged budget.

    python benchmarks/learning_curves.py                                   # leave_out_l2, pgd_at and meta_so, 20 epochs
    python benchmarks/learning_curves.py --methods pgd_at avg --epochs 30 --n-examples 300
    python benchmarks/learning_curves.py --quick                           # smoke test: seconds

Each method trains once on the protocol's training split (its validation digits held out, as in heldout.py), one
epoch further at a time: a checkpointed run resumed to the next epoch, which equals an uninterrupted run bit for
bit. After every epoch its model is attacked white-box in eval mode with the protocol's held-out and training
attacks on ``--n-examples`` test digits (no adaptation). The JSON is written after every epoch and a rerun
resumes where it stopped. The summary gives, per method, the change of the held-out mean accuracy over the last
fifth of the epochs run, and the first epoch (at least ``--min-epochs``) from which that change stays under one
point: the budget the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from heldout import ROOT, load_data, load_protocol, split_validation, train

import metaadv as ma

__all__ = ["converged_epoch", "curve_point"]


def curve_point(model: torch.nn.Module, test: Any, protocol: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    """Clean, per-attack, mean and union accuracy (%) of ``model`` under the held-out and the training attacks."""
    out: dict[str, Any] = {}
    for name, attacks in (("heldout", protocol["held_out"]), ("train", protocol["train_attacks"])):
        report = ma.evaluate(model, test, attacks, n_examples=n, seed=seed)
        per_attack = {k: 100 * v for k, v in report.per_attack.items()}
        out[name] = {"mean": sum(per_attack.values()) / len(per_attack), "union": 100 * report.union_acc,
                     "per_attack": per_attack}  # fmt: skip
        out["clean"] = 100 * report.clean_acc
    return out


def converged_epoch(means: list[float], min_epochs: int, tolerance: float = 1.0) -> int | None:
    """The first epoch E >= ``min_epochs`` (1-based) whose held-out mean moved by under ``tolerance`` points over
    the last fifth of the epochs up to it, and stays so for every later epoch run; None if there is none."""
    found = None
    for e in range(min_epochs, len(means) + 1):
        start = max(1, e - max(1, e // 5))
        settled = abs(means[e - 1] - means[start - 1]) < tolerance
        found = (found or e) if settled else None
    return found


def run(method: str, protocol: dict[str, Any], args: argparse.Namespace, record: dict[str, Any], out: Path) -> None:
    train_data, test = load_data(protocol)
    train_data, _ = split_validation(train_data, protocol["tune"]["examples"])
    points = record.setdefault(method, [])
    where = {"checkpoint_dir": args.work / protocol["name"] / method, "resume": True, "keep_last": 1}
    for epoch in range(len(points) + 1, args.epochs + 1):
        start = time.perf_counter()
        result = train(method, {**protocol, "epochs": epoch}, train_data, args.seed, args.device, **where)
        trained = time.perf_counter() - start
        point = {"epoch": epoch, "train_seconds": trained, **curve_point(result.model, test, protocol,
                                                                          args.n_examples, args.seed)}  # fmt: skip
        points.append(point)
        out.write_text(json.dumps(record, indent=1))
        print(f"{method} epoch {epoch}: held-out mean {point['heldout']['mean']:.1f}, union "
              f"{point['heldout']['union']:.1f}, training attacks {point['train']['mean']:.1f} ({trained:.0f} s)",
              flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", type=Path, default=ROOT / "benchmarks" / "protocols" / "leave_out_l2.yaml")
    p.add_argument("--methods", nargs="+", default=["pgd_at", "meta_so"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--min-epochs", type=int, default=15)
    p.add_argument("--n-examples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=Path("runs/learning_curves"), help="the runs' checkpoints")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/learning_curves_*.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args()
    protocol = load_protocol(args.protocol, args.quick)
    if args.quick:
        args.epochs, args.min_epochs, args.n_examples = 2, 1, 16
    out = args.out or Path(f"benchmarks/results/learning_curves_{protocol['name']}_seed{args.seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(out.read_text()) if out.exists() else {}
    for method in args.methods:
        run(method, protocol, args, record, out)
    for method in args.methods:
        means = [pt["heldout"]["mean"] for pt in record[method]]
        tail = means[-1] - means[max(0, len(means) - 1 - max(1, len(means) // 5))]
        print(f"{method}: held-out mean {means[-1]:.1f} after {len(means)} epochs, {tail:+.1f} over the last fifth; "
              f"converged from epoch {converged_epoch(means, args.min_epochs)}")  # fmt: skip


if __name__ == "__main__":
    main()
