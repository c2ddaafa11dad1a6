"""Speed-up of task-parallel meta-training on CPU: 1 process with 2 threads vs 2 torchrun processes with 1 thread each.

    python benchmarks/distributed_speedup.py                  # 3 warm-up + 20 timed meta-steps per variant
    python benchmarks/distributed_speedup.py --steps 40 --out speedup.json

Both variants run the same meta-batches (SmallCNN on mnist5k, 4 tasks of 32 support + 32 query digits drawn
from FGSM and PGD-5 in Linf/L2, one second-order inner step); the 2-process run gives each rank 2 tasks.
The time per meta-step is read from the training history after the warm-up steps, so process start-up,
data loading and process-group set-up are left out (the wall-clock of each launch is printed beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import metaadv as ma
from metaadv import distributed
from metaadv.models import SmallCNN

TASKS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=5)", "pgd_l2(eps=2.0, steps=5)"]
WARMUP = 3


def worker(out: str, steps: int) -> None:
    """Meta-train for WARMUP + ``steps`` meta-steps; rank 0 writes the seconds per timed step to ``out``."""
    train, _ = ma.data.load("mnist5k")
    torch.manual_seed(0)
    config = ma.MetaConfig(
        tasks_per_batch=4, support_size=32, query_size=32, sample_replace=True, steps=WARMUP + steps, device="cpu"
    )
    history = ma.meta_train(SmallCNN(), train, ma.AttackDistribution(TASKS), config, progress=False).history
    if distributed.is_main():
        per_step = (history[-1]["seconds"] - history[WARMUP - 1]["seconds"]) / steps
        record = {"processes": distributed.world_size(), "threads": torch.get_num_threads(), "s_per_step": per_step}
        Path(out).write_text(json.dumps(record))
    distributed.shutdown()


def launch(command: list[str], threads: int, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    start = time.perf_counter()
    subprocess.run(command, env={**env, "OMP_NUM_THREADS": str(threads)}, check=True)
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed meta-steps per variant (after 3 warm-up steps)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--worker", metavar="FILE", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    me = [str(Path(__file__).resolve()), "--steps", str(args.steps), "--worker"]
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp, "one.json"), Path(tmp, "two.json")
        single = launch([sys.executable, *me, str(one)], threads=2, out=one)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        double = launch([*torchrun, *me, str(two)], threads=1, out=two)
    speedup = single["s_per_step"] / double["s_per_step"]
    print(f"{'variant':<28}{'s/meta-step':>12}{'wall s':>9}")
    for name, r in (("1 process x 2 threads", single), ("2 processes x 1 thread", double)):
        print(f"{name:<28}{r['s_per_step']:>12.3f}{r['wall_s']:>9.1f}")
    print(f"speed-up of 2 processes over 1: {speedup:.2f}x ({os.cpu_count()} CPUs, torch {torch.__version__})")
    if args.out:
        result = {"single": single, "two_processes": double, "speedup": speedup, "steps": args.steps}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
