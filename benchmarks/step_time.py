"""One meta-step vs one PGD-AT step at the same attack budget, timed side by side in one run.

    python benchmarks/step_time.py                 # SmallCNN on mnist5k shapes, CPU or CUDA
    python benchmarks/step_time.py --tasks 8 --attack "pgd_linf(eps=0.3, steps=10)" --json out.json

Both steps see tasks * (support + query) examples and craft each of them with the same attack; the
meta-step adds the inner loop (second order by default) and per-task forward passes. Timings are
interleaved (meta, AT, meta, AT, ...) after warm-up and reported as medians.
"""

from __future__ import annotations

import argparse
import json

import torch
from speed import time_side_by_side  # benchmarks/speed.py: the one interleaved timing loop

import metaadv as ma
from metaadv.baselines import adversarial_loss
from metaadv.engine import resolve_device
from metaadv.functional import state
from metaadv.meta import meta_batch_loss
from metaadv.models import SmallCNN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--shots", type=int, default=32, help="support = query = shots per task")
    p.add_argument("--attack", default="pgd_linf(eps=0.3, steps=5)")
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    train, _ = ma.data.load("mnist5k")
    n = args.tasks * 2 * args.shots
    x, y = train.x[:n].to(device), train.y[:n].to(device)
    model = SmallCNN().to(device).train()
    params, buffers = state(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dist = ma.AttackDistribution([args.attack], seed=0)
    cfg = ma.MetaConfig(tasks_per_batch=args.tasks, support_size=args.shots, query_size=args.shots,
                        sample_replace=True, first_order=args.first_order)  # fmt: skip
    attack = ma.attacks.make(args.attack)

    def meta_step() -> None:
        out = meta_batch_loss(model, params, buffers, dist.sample(args.tasks), x, y, cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    def at_step() -> None:
        loss = adversarial_loss(model, [attack], x, y, "pgd_at").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    meta_step(), at_step()  # a first warm-up; time_side_by_side adds one more, then interleaves
    med = time_side_by_side({"meta": meta_step, "pgd_at": at_step}, args.repeats, device)
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "tasks": args.tasks, "shots": args.shots, "attack": attack.spec, "examples": n,
        "first_order": args.first_order, "meta_step_s": med["meta"], "pgd_at_step_s": med["pgd_at"],
        "ratio": med["meta"] / med["pgd_at"],
    }  # fmt: skip
    print(f"{n} examples ({args.tasks} tasks x {args.shots}+{args.shots}), attack {attack.spec}, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")  # fmt: skip
    print("| step | seconds | ratio |\n|---|---:|---:|")
    print(f"| PGD-AT | {med['pgd_at']:.3f} | 1.00 |")
    order = "first" if args.first_order else "second"
    print(f"| meta-step ({order} order, 1 inner step) | {med['meta']:.3f} | {result['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
