"""Time to robustness: held-out union accuracy against training wall-clock, for PGD-AT and metaadv with
and without adversarial-example reuse (``MetaConfig.reuse_every``), in one run on one machine.

    python benchmarks/time_to_robustness.py                       # leave_out_l2 protocol, seed 0, CPU or GPU
    python benchmarks/time_to_robustness.py --reuse 2 4 --seeds 0 1 2
    python benchmarks/time_to_robustness.py --quick               # smoke test: seconds

Each method trains once with a checkpoint every ``--every`` steps; afterwards every checkpoint's model is
attacked white-box in eval mode with the protocol's held-out attacks (their union accuracy on
``n_examples`` test digits), and placed at the wall-clock its checkpoint was written (evaluation time
excluded). The summary gives, per metaadv variant, the first wall-clock at which it reaches PGD-AT's
final held-out union accuracy, as a fraction of PGD-AT's whole training time (the issue's target: at
most 0.5 with reuse). Writes JSON and a figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import yaml
from heldout import git_commit, hardware

import metaadv as ma
from metaadv import checkpoint as ckpt
from metaadv.baselines import adversarial_train

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "benchmarks" / "protocols" / "leave_out_l2.yaml"
QUICK = {"epochs": 1, "n_examples": 32, "train_examples": 256, "every": 2}


def train_with_checkpoints(method: str, reuse: int, protocol: dict, data, seed: int, device: str, every: int,
                           directory: Path) -> list[Path]:  # fmt: skip
    """Train ``method`` ("pgd_at" or "meta_so" with ``reuse_every=reuse``); the checkpoint files, oldest first."""
    torch.manual_seed(seed)
    model = ma.models.build(protocol["model"])
    where = {"checkpoint_dir": directory, "checkpoint_every": every, "keep_last": 10**6, "progress": False}
    if method == "pgd_at":
        adversarial_train(model, data, [protocol["pgd_at_attack"]], method="pgd_at", epochs=protocol["epochs"],
                          batch_size=protocol["batch_size"], seed=seed, device=device, **where)  # fmt: skip
    else:
        config = ma.MetaConfig(**protocol["meta"], first_order=False, reuse_every=reuse, epochs=protocol["epochs"],
                               seed=seed, device=device)  # fmt: skip
        ma.meta_train(model, data, ma.AttackDistribution(protocol["train_attacks"], seed=seed), config, **where)
    return ckpt.list_checkpoints(directory)


def curve(paths: list[Path], protocol: dict, test, seed: int, device: str) -> list[dict[str, float]]:
    """(step, seconds, held-out union) at each checkpoint: its model attacked white-box in eval mode."""
    points = []
    model = ma.models.build(protocol["model"])
    for path in paths:
        payload = ckpt.load_checkpoint(path)
        model.load_state_dict(payload["state"]["model"])
        seconds = json.loads(payload["history"].rsplit("\n", 1)[-1])["seconds"]
        report = ma.evaluate(model.eval(), test, protocol["held_out"], n_examples=protocol["n_examples"], seed=seed,
                             batch_size=protocol["eval_batch_size"], device=device)  # fmt: skip
        points.append({"step": payload["step"], "seconds": seconds, "union": report.union_acc})
    return points


def time_to_reach(points: list[dict[str, float]], target: float) -> float | None:
    """The wall-clock of the first checkpoint whose union accuracy is >= ``target`` (None if none is)."""
    return next((p["seconds"] for p in points if p["union"] >= target), None)


def summarize(curves: dict[str, list[dict[str, float]]]) -> tuple[dict[str, Any], str]:
    pgd = curves["pgd_at"]
    target, budget = pgd[-1]["union"], pgd[-1]["seconds"]
    rows, out = [], {"pgd_at_final_union": target, "pgd_at_seconds": budget, "methods": {}}
    for name, points in curves.items():
        reach = time_to_reach(points, target)
        ratio = None if reach is None else reach / budget
        out["methods"][name] = {"final_union": points[-1]["union"], "seconds": points[-1]["seconds"],
                                "seconds_to_pgd_at_union": reach, "fraction_of_pgd_at_time": ratio}  # fmt: skip
        when = "never" if reach is None else f"{reach:.1f} s ({ratio:.2f}x PGD-AT's time)"
        rows.append(f"| {name} | {points[-1]['seconds']:.1f} | {100 * points[-1]['union']:.1f} | {when} |")
    head = (f"Target: PGD-AT's final held-out union {100 * target:.1f}% after {budget:.1f} s.\n\n"
            "| method | train s | final union % | reaches PGD-AT's union at |\n|---|---|---|---|")  # fmt: skip
    return out, "\n".join([head, *rows])


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p["seconds"] for p in points], [100 * p["union"] for p in points], marker="o", label=name)
    ax.axhline(100 * curves["pgd_at"][-1]["union"], color="gray", ls="--", lw=1, label="PGD-AT final")
    ax.set(xlabel="training wall-clock (s)", ylabel="held-out union accuracy (%)", title="Time to robustness")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", type=Path, default=PROTOCOL)
    p.add_argument("--reuse", type=int, nargs="+", default=[4], help="reuse_every values to compare with 1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--every", type=int, default=10, help="checkpoint (curve point) every this many steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--figure", type=Path, default=None, help="figure path (default docs/figures/...)")
    args = p.parse_args()
    protocol = yaml.safe_load(args.protocol.read_text())
    protocol.setdefault("eval_batch_size", 256)
    every = args.every
    if args.quick:
        protocol, every = {**protocol, **QUICK}, QUICK["every"]
    device = str(ma.trainer.resolve_device(args.device))
    name = f"time_to_robustness_{protocol['name']}_{torch.device(device).type}"
    out = args.out or ROOT / "benchmarks" / "results" / f"{name}.json"
    figure = args.figure or ROOT / "docs" / "figures" / f"{name}.png"
    train_data, test = ma.data.load(protocol["data"])
    if "train_examples" in protocol:
        train_data = ma.data.to_tensors(train_data, protocol["train_examples"])
    runs = [("pgd_at", 1), ("meta_so", 1), *((f"meta_so_reuse{r}", r) for r in args.reuse)]
    seeds = {}
    for seed in args.seeds:
        curves = {}
        for method, reuse in runs:
            with tempfile.TemporaryDirectory() as tmp:
                paths = train_with_checkpoints(method.split("_reuse")[0], reuse, protocol, train_data, seed, device,
                                               every, Path(tmp))  # fmt: skip
                curves[method] = curve(paths, protocol, test, seed, device)
            print(f"seed {seed} {method}: {curves[method][-1]['seconds']:.1f} s, "
                  f"held-out union {100 * curves[method][-1]['union']:.1f}%", flush=True)  # fmt: skip
        summary, table = summarize(curves)
        seeds[str(seed)] = {"curves": curves, "summary": summary}
        print(f"\n## Seed {seed}\n\n{table}\n", flush=True)
        plot(curves, figure.with_name(f"{figure.stem}_seed{seed}.png") if len(args.seeds) > 1 else figure)
    model = ma.models.build(protocol["model"]).to(device)
    versions = {"metaadv": ma.__version__, "torch": torch.__version__}
    record = {"protocol": protocol, "reuse": args.reuse, "every": every, "seeds": seeds, "git_commit": git_commit(),
              "hardware": hardware(model), "versions": versions}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out} and {figure}")


if __name__ == "__main__":
    main()
