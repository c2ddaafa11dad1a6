"""The ``metaadv`` command: ``metaadv train --config FILE`` and ``metaadv eval --checkpoint DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__, data, models
from .config import RunConfig, load_run_config
from .evaluate import evaluate
from .tasks import AttackDistribution
from .trainer import meta_train

log = logging.getLogger("metaadv")


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save_run(out: Path, cfg: RunConfig, model: torch.nn.Module, history: list[dict], seconds: float) -> None:
    """Write ``config.json`` (resolved), ``model.pt`` (state dict) and ``history.jsonl`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"metaadv": __version__, "torch": torch.__version__, "train_seconds": seconds}
    _write_atomic(out / "config.json", lambda f: f.write(json.dumps({**cfg.to_dict(), "run": meta}, indent=2).encode()))
    _write_atomic(out / "model.pt", lambda f: torch.save(model.state_dict(), f))
    lines = "".join(json.dumps(r) + "\n" for r in history)
    _write_atomic(out / "history.jsonl", lambda f: f.write(lines.encode()))


def load_run(checkpoint: Path) -> tuple[RunConfig, torch.nn.Module]:
    """Rebuild the trained model of a ``metaadv train`` output directory (weights loaded safely)."""
    cfg_path, weights = checkpoint / "config.json", checkpoint / "model.pt"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a metaadv run directory (needs config.json and model.pt)")
    values = json.loads(cfg_path.read_text())
    values.pop("run", None)
    cfg = RunConfig.from_dict(values)
    model = models.build(cfg.model)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return cfg, model.eval()


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"epochs": args.epochs, "steps": args.steps, "device": args.device,
                                   "seed": args.seed}.items() if v is not None}  # fmt: skip
    cfg = load_run_config(args.config, overrides)
    train, _ = data.load(cfg.data, cfg.data_root)
    model = models.build(cfg.model)
    tasks = AttackDistribution(**cfg.tasks)
    print(f"meta-training {type(model).__name__} on {cfg.data} over {len(tasks)} attack types: "
          f"{', '.join(a.spec for a in tasks.types)}")  # fmt: skip
    result = meta_train(model, train, tasks, cfg.meta, progress=not args.quiet)
    out = Path(args.out)
    save_run(out, cfg, result.model, result.history, result.seconds)
    last = result.history[-1]
    print(f"done: {len(result.history)} meta-steps in {result.seconds:.1f}s, last meta-loss {last['loss']:.3f}")
    print(f"wrote {out}/model.pt, config.json, history.jsonl")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg, model = load_run(Path(args.checkpoint))
    settings = dict(cfg.eval)
    if args.attacks:
        settings["attacks"] = args.attacks
    for key in ("n_examples", "adapt_shots", "seed"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if not settings.get("attacks"):
        raise ValueError("no attacks to evaluate: pass --attacks or give eval.attacks in the run config")
    _, test = data.load(cfg.data, cfg.data_root)
    start = time.perf_counter()
    report = evaluate(model, test, settings.pop("attacks"), progress=not args.quiet, **settings)
    print(report.to_markdown())
    print(f"\n({report.n_examples} test examples, {time.perf_counter() - start:.1f}s)")
    out = Path(args.out or args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", lambda f: f.write(report.to_json().encode()))
    print(f"wrote {out}/report.json")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaadv", description="Meta-adversarial training over attack types.")
    p.add_argument("--version", action="version", version=f"metaadv {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train a model from a YAML/JSON run config")
    t.add_argument("--config", required=True, help="run config (.yaml/.json), e.g. configs/mnist5k.yaml")
    t.add_argument("--out", default="runs/latest", help="output directory (default: runs/latest)")
    g = t.add_argument_group("overrides of the config's meta section")
    g.add_argument("--epochs", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--device")
    g.add_argument("--seed", type=int)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run against attacks (prints a table, writes JSON)")
    e.add_argument("--checkpoint", required=True, help="a `metaadv train` output directory")
    e.add_argument("--attacks", nargs="+", help="attack specs (default: the run config's eval.attacks)")
    e.add_argument("--n-examples", dest="n_examples", type=int)
    e.add_argument("--adapt-shots", dest="adapt_shots", type=int)
    e.add_argument("--seed", type=int)
    e.add_argument("--out", help="where to write report.json (default: the checkpoint directory)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"metaadv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
