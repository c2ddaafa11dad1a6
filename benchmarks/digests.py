"""Digests of short training runs, one per meta option and per method: compare them before and after a refactor
to show that results stayed bit for bit the same.

    python benchmarks/digests.py --out before.json            # on the old commit
    python benchmarks/digests.py --out after.json --against before.json   # on the new one: prints OK / DIFF per run

Each run trains a seeded SmallCNN for 3 steps on 512 mnist5k digits on the CPU; its digest is a SHA-256 of the
final state_dict, of the per-step history (losses, per-task statistics, skips) and of the options' artifacts.
Digests are comparable on one machine, torch version and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

import metaadv as ma

SPECS = ["fgsm(eps=0.3)", "pgd_linf(eps=0.3, steps=2)", "pgd_l2(eps=2.0, steps=2)"]
LOOPED = {
    "default": {}, "fo": {"first_order": True}, "attention": {"task_attention": True},
    "task_bn": {"task_bn": True}, "step_bn": {"per_step_bn": True, "inner_steps": 2},
    "film_type": {"task_encoding": "type"}, "film_support": {"task_encoding": "support"},
    "dropout": {"meta_dropout": 0.2}, "reuse": {"reuse_every": 2}, "metasgd": {"learn_inner_lr": True},
    "fo_until": {"first_order_until": 2}, "adapted": {"query_attack": "adapted"}, "clean": {"clean_weight": 0.3},
    "head": {"inner_params": "head", "proximal": 0.1}, "generator": {"persistent_generator": True},
}  # fmt: skip
# the looped reference (explicit: the default meta-step is batched), then the batched step with each option
META = {**{k: {**v, "batched": False} for k, v in LOOPED.items()},
        **{("batched_" + k).removesuffix("_default"): {**v, "batched": True} for k, v in LOOPED.items()}}  # fmt: skip
BASELINES = {"erm": [], "pgd_at": [SPECS[1]], "fast_at": ["fgsm_rs(eps=0.3)"], "trades": [SPECS[1]],
             "avg": SPECS[1:], "max": SPECS[1:], "msd": SPECS[1:], "sat": SPECS[1:], "ramp": SPECS[1:]}  # fmt: skip
HISTORY = ("loss", "query_loss", "query_acc", "grad_norm", "skipped", "task_weights", "crafted", "gp_cos", "task_names")


def _feed(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _feed(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _feed(v, h)
    else:
        h.update(repr(obj).encode())


def digest(obj: Any) -> str:
    h = hashlib.sha256()
    _feed(obj, h)
    return h.hexdigest()[:16]


def run(name: str, x: torch.Tensor, y: torch.Tensor) -> ma.TrainResult:
    torch.manual_seed(0)
    model = ma.models.SmallCNN()
    if name in META:
        specs = SPECS + (["generator(eps=0.3, steps=2)"] if "generator" in name else [])
        config = ma.MetaConfig(tasks_per_batch=2, support_size=8, query_size=8, steps=3, device="cpu", **META[name])
        return ma.meta_train(model, (x, y), ma.AttackDistribution(specs, seed=0), config, progress=False)
    loop = ma.LoopConfig(steps=3, batch_size=32, device="cpu")
    return ma.train(name, model, (x, y), BASELINES[name], loop=loop, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON of the digests")
    p.add_argument("--against", type=Path, help="an earlier JSON: print OK or DIFF per run")
    p.add_argument("runs", nargs="*", help=f"runs (default: all): {', '.join([*META, *BASELINES])}")
    args = p.parse_args()
    train, _ = ma.data.load("mnist5k")
    x, y = train.x[:512], train.y[:512]
    out = {}
    for name in args.runs or [*META, *BASELINES]:
        result = run(name, x, y)
        artifacts = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in result.artifacts.items()}
        history = [{k: r[k] for k in HISTORY if k in r} for r in result.history]
        out[name] = {"model": digest(result.model.state_dict()), "history": digest(history),
                     "artifacts": digest(artifacts)}  # fmt: skip
        print(name, out[name], flush=True)
    args.out.write_text(json.dumps(out, indent=1))
    if args.against:
        before = json.loads(args.against.read_text())
        for name, now in out.items():
            then = before.get(name)
            diff = [k for k in now if then is None or then.get(k) != now[k]]
            print(f"{name}: {'OK' if not diff else 'DIFF ' + ', '.join(diff)}")


if __name__ == "__main__":
    main()
