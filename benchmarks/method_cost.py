"""Training cost of every method of a held-out protocol, timed side by side in one run.

    python benchmarks/method_cost.py --protocol benchmarks/protocols/unforeseen_lp_trained.yaml
    python benchmarks/method_cost.py --protocol benchmarks/protocols/leave_out_l2.yaml --steps 20 --json out.json

The ``train time`` of ``heldout.py``'s runs is wall-clock of whole runs, which on a shared machine depends on
what else ran beside them. Here every method trains for ``--steps`` optimizer steps exactly as the protocol
trains it (``heldout.train``: same model, data, batch or meta-batch, attacks), the methods interleaved in
``--repeats`` rounds, and the median seconds per step (set-up excluded) is reported with its ratio to
PGD-AT's and the time of the protocol's full training budget that it implies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from heldout import DEFAULT_PROTOCOL, load_data, load_protocol, plan, positive_int, train

import metaadv as ma
from metaadv.engine import resolve_device
from metaadv.training_methods import get


def steps_per_epoch(method: str, protocol: dict, n_train: int) -> int:
    """Optimizer steps in one epoch (full batches only, as ``engine.fit``): batches of ``batch_size``, or
    for a meta method (or meta variant) meta-batches of tasks x (support + query) examples."""
    base, _, settings = plan(method, protocol)
    if not get(base).meta:
        return n_train // protocol["batch_size"]
    return n_train // ma.MetaConfig(**settings).examples_per_step


def time_methods(protocol: dict, methods: list[str], steps: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per optimizer step of each method, its rounds interleaved with the others'.

    A round times a 1-step run and a (1 + ``steps``)-step run of each method and keeps the difference over
    ``steps``: the cost of a step, without building the model and moving the data."""
    train_data, _ = load_data(protocol)

    def seconds(method: str, n: int, seed: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        train(method, protocol, train_data, seed=seed, device=device, steps=n)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for method in methods:  # warm-up (allocator, attack construction)
        seconds(method, 1, 0)
    per_step: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeats):
        for method in methods:
            per_step[method].append((seconds(method, 1 + steps, r) - seconds(method, 1, r)) / steps)
    return {m: statistics.median(v) for m, v in per_step.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", type=Path, default=DEFAULT_PROTOCOL)
    p.add_argument("--methods", nargs="+", help="subset of the protocol's methods (default: all)")
    p.add_argument("--steps", type=positive_int, default=10, help="optimizer steps per timed run")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    protocol = load_protocol(args.protocol, quick=False)
    methods = args.methods or protocol["methods"]
    variants = {*protocol.get("meta_variants", {}), *protocol.get("baseline_variants", {})}
    unknown = sorted(set(methods) - set(protocol["methods"]) - variants)
    if unknown:
        p.error(f"{unknown} are not methods of {args.protocol.name}: {protocol['methods']}")
    device = str(resolve_device(args.device))
    n_train = len(load_data(protocol)[0])
    seconds = time_methods(protocol, methods, args.steps, args.repeats, device)
    reference = seconds.get("pgd_at")
    rows = {
        m: {
            "seconds_per_step": s,
            "ratio_to_pgd_at": s / reference if reference else None,
            "steps_per_epoch": steps_per_epoch(m, protocol, n_train),
            "budget_seconds": s * steps_per_epoch(m, protocol, n_train) * protocol["epochs"],
        }
        for m, s in seconds.items()
    }
    print(f"{protocol['name']} on {device} ({torch.get_num_threads()} threads), median of {args.repeats} rounds "
          f"of {args.steps} steps")  # fmt: skip
    print(f"{'method':<14}{'s/step':>9}{'x pgd_at':>10}{'steps/epoch':>13}{'full budget (s)':>17}")
    for m, r in rows.items():
        ratio = f"{r['ratio_to_pgd_at']:.2f}" if r["ratio_to_pgd_at"] else "-"
        print(f"{m:<14}{r['seconds_per_step']:>9.3f}{ratio:>10}{r['steps_per_epoch']:>13}{r['budget_seconds']:>17.0f}")
    if args.json:
        record = {"protocol": protocol["name"], "device": device, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "metaadv": ma.__version__, "steps": args.steps,
                  "repeats": args.repeats, "epochs": protocol["epochs"], "methods": rows}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
