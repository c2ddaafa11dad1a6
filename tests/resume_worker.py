"""A tiny meta-training run for tests/test_resume.py, meant to be killed and resumed.

    python tests/resume_worker.py CHECKPOINT_DIR OUT_FILE   # checkpoint every step, resume if possible
    python tests/resume_worker.py - OUT_FILE                # the uninterrupted reference (no checkpoints)

Writes OUT_FILE (torch.save) with the final state dict and the history once training completes.
"""

from __future__ import annotations

import sys

import torch

import metaadv as ma
from metaadv.models import SmallCNN

STEPS = 24


def main(checkpoint_dir: str, out: str) -> None:
    torch.set_num_threads(1)  # bitwise equality across processes needs the same thread count
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, 28, 28, generator=g)  # 5 meta-steps per epoch: several epoch boundaries
    y = torch.randint(0, 10, (80,), generator=g)
    torch.manual_seed(0)
    model = SmallCNN(hidden=32)
    tasks = ma.AttackDistribution(["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)"], seed=0)  # PGD: random starts
    config = ma.MetaConfig(tasks_per_batch=1, support_size=8, query_size=8, sample_replace=True, steps=STEPS)
    checkpoints = {} if checkpoint_dir == "-" else {"checkpoint_dir": checkpoint_dir, "checkpoint_every": 1}
    result = ma.meta_train(model, (x, y), tasks, config, progress=False, resume=bool(checkpoints), **checkpoints)
    history = [{k: r[k] for k in ("step", "epoch", "loss", "task_specs", "query_acc")} for r in result.history]
    torch.save({"state": model.state_dict(), "history": history}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
