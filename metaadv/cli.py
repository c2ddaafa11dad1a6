"""The ``metaadv`` command: ``metaadv train [--method NAME] --config FILE`` and ``metaadv eval --checkpoint DIR``.

``torchrun --nproc_per_node N -m metaadv.cli train --config FILE`` trains with the tasks of each meta-batch
split over N processes (docs/scaling.md); only rank 0 prints and writes the output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__, data, distributed, models, training_methods
from .attacks import make
from .checkpoint import CheckpointError, UnsafeCheckpointError, environment, list_checkpoints, write_atomic
from .config import RunConfig, load_run_config, read_config_file, run_config_from
from .engine import NonFiniteLossError, TrainingInterrupted, TrainResult, resolve_device
from .eval import evaluate
from .meta import options
from .tasks import AttackDistribution
from .training_methods import meta as meta_methods

log = logging.getLogger("metaadv")


def _write_atomic(path: Path, write: Any) -> None:
    buffer = io.BytesIO()
    write(buffer)
    write_atomic(path, buffer.getvalue())


def write_config(out: Path, cfg: RunConfig, **run: Any) -> None:
    """Write ``config.json``: the resolved config plus a ``run`` section (versions, git commit, hardware, ``run``)."""
    out.mkdir(parents=True, exist_ok=True)
    info = {"metaadv": __version__, "torch": torch.__version__, "environment": environment(), **run}
    _write_atomic(out / "config.json", lambda f: f.write(json.dumps({**cfg.to_dict(), "run": info}, indent=2).encode()))


def write_history(out: Path, history: list[dict]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in history)
    _write_atomic(out / "history.jsonl", lambda f: f.write(lines.encode()))


def save_run(out: Path, cfg: RunConfig, result: TrainResult) -> list[str]:
    """Write ``config.json`` (resolved, with versions, git commit, hardware), ``model.pt``, ``history.jsonl``
    and, for a run whose meta options learned adaptation state (their artifacts: Meta-SGD step sizes, per-type
    or per-step BatchNorm statistics), ``meta_state.pt``; returns the names of the files written."""
    write_config(out, cfg, status="done", train_seconds=result.seconds)
    _write_atomic(out / "model.pt", lambda f: torch.save(result.model.state_dict(), f))
    state = options.save_artifacts(result.artifacts)
    if state:
        _write_atomic(out / "meta_state.pt", lambda f: torch.save(state, f))
    else:  # an earlier run's in the same directory would be loaded with this run's model
        (out / "meta_state.pt").unlink(missing_ok=True)
    write_history(out, result.history)
    return ["model.pt", "config.json", "history.jsonl", *(["meta_state.pt"] if state else [])]


def _load_tensors(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``, with the errors ``load_run`` promises."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains pickled Python objects beyond tensors, which could run "
            "code when loaded (torch.load weights_only=True rejected it). Only load files you trust."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable {what} file: {e}") from None


def load_run(checkpoint: Path) -> tuple[RunConfig, torch.nn.Module, dict[str, Any]]:
    """Rebuild a ``metaadv train`` output directory: its config, its trained model (eval mode; weights loaded
    safely) and the ``evaluate`` options that adapt it. For a meta run, its own inner loop: ``adapt_lr``,
    ``adapt_params`` and ``adapt_proximal`` from the config, then what its meta options' artifacts in
    ``meta_state.pt`` give (Meta-SGD's learned ``adapt_lr``, ``task_bn``, ``step_bn``); a baseline run has
    none (``evaluate``'s defaults)."""
    cfg_path, weights = checkpoint / "config.json", checkpoint / "model.pt"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a metaadv run directory (needs config.json and model.pt)")
    cfg = _read_run_config(cfg_path)
    meta = training_methods.get(cfg.method).meta  # the meta options apply to meta runs only
    model = models.build(cfg.model)
    if meta:
        model = options.wrap(model, cfg.meta, len(cfg.tasks.get("specs", ())))  # FiLM, meta-dropout
    try:
        model.load_state_dict(_load_tensors(weights, "model"))
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{weights} does not fit the model {cfg.model}: {e}") from None
    settings: dict[str, Any] = {"adapt_lr": cfg.meta.inner_lr, "adapt_params": cfg.meta.inner_params,
                                "adapt_proximal": cfg.meta.proximal} if meta else {}  # fmt: skip
    saved = _load_tensors(path, "meta state") if (path := checkpoint / "meta_state.pt").is_file() else {}
    try:
        settings |= options.artifact_eval_options(options.load_artifacts(model, saved))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit the model {cfg.model}: {e!r}") from None
    return cfg, model.eval(), settings


def _read_run_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of a run directory's ``config.json`` (without its ``run`` provenance section)."""
    values = read_config_file(path)
    values.pop("run", None)
    return run_config_from(values, overrides)


def _train_inputs(cfg: RunConfig) -> tuple[RunConfig, Any, dict[str, Any]]:
    """The config as ``cfg.method`` runs it (a meta method's fixed fields set in its meta section), its attacks
    (a meta method: the task distribution; a baseline: ``methods.NAME.attacks``, else ``tasks.specs``, none
    for a method without attacks) and its settings (the meta section's, or ``methods.NAME``'s)."""
    method = training_methods.get(cfg.method)
    if method.meta:
        config = meta_methods.meta_config(cfg.method, cfg.meta.loop, meta_methods.settings_of(cfg.method, cfg.meta))
        cfg = dataclasses.replace(cfg, meta=config)
        return cfg, AttackDistribution(**cfg.tasks), meta_methods.settings_of(cfg.method, config)
    settings = dict(cfg.methods.get(cfg.method, {}))
    attacks = settings.pop("attacks", cfg.tasks["specs"] if method.attacks[1] != 0 else [])
    return cfg, attacks, settings


def _announce(cfg: RunConfig, model: torch.nn.Module, attacks: Any) -> str:
    """The first line ``metaadv train`` prints: the model, the method and what it trains on."""
    if isinstance(attacks, AttackDistribution):
        world = f" ({distributed.world_size()} processes)" if distributed.world_size() > 1 else ""
        named = "" if cfg.method == "meta" else f" with {cfg.method}"
        return (f"meta-training {type(model).__name__}{named} on {cfg.data} over {len(attacks)} attack types: "
                f"{', '.join(a.spec for a in attacks.types)}{world}")  # fmt: skip
    lead = f"training {type(model).__name__} with {cfg.method}"
    if not attacks:
        return f"{lead} on clean {cfg.data} examples"
    return f"{lead} on {cfg.data} against {len(attacks)} attack(s): {', '.join(make(a).spec for a in attacks)}"


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"epochs": args.epochs, "steps": args.steps, "device": args.device,
                                   "seed": args.seed}.items() if v is not None}  # fmt: skip
    out = Path(args.out)
    if args.config is None:
        if not args.resume:
            raise ValueError("--config is required (it may be left out only with --resume)")
        if not (out / "config.json").is_file():
            raise FileNotFoundError(f"--resume without --config needs {out}/config.json from an earlier run")
        cfg = _read_run_config(out / "config.json", overrides)
    else:
        cfg = load_run_config(args.config, overrides)
    if args.method is not None:
        cfg = dataclasses.replace(cfg, method=args.method)
    if not args.resume and list_checkpoints(out / "checkpoints"):
        raise ValueError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or another --out")
    distributed.setup(resolve_device(cfg.meta.device))  # under torchrun: join the process group (else nothing)
    meta, main = training_methods.get(cfg.method).meta, distributed.is_main()
    if distributed.world_size() > 1 and not meta:
        raise ValueError(f"method {cfg.method!r} trains in one process: torchrun splits the meta methods' tasks only")
    with distributed.main_first():  # rank 0 downloads a torchvision dataset before the others read it
        train, _ = data.load(cfg.data, cfg.data_root)
    torch.manual_seed(cfg.meta.seed)  # the initialization is part of the run: same config, same weights
    model = models.build(cfg.model)
    cfg, attacks, settings = _train_inputs(cfg)
    if main:
        print(_announce(cfg, model, attacks))
    if main and not (args.resume and (out / "config.json").is_file()):  # a resume rewrites it once it matches
        write_config(out, cfg, status="running")
    try:
        result = training_methods.train(
            cfg.method, model, train, attacks, loop=cfg.meta.loop, progress=not args.quiet,
            checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
            resume=args.resume, **settings,
        )  # fmt: skip
    except TrainingInterrupted as e:
        if main:
            write_history(out, e.history)
            write_config(out, cfg, status=f"interrupted after step {e.step}")
            world = distributed.world_size()
            launcher = f"torchrun --nproc_per_node {world} -m metaadv.cli" if world > 1 else "metaadv"
            print(f"metaadv train: {e}; continue with: {launcher} train --out {out} --resume", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        if main:
            write_history(out, e.history)
            write_config(out, cfg, status="failed: non-finite loss")
            print(f"metaadv train: error: {e}", file=sys.stderr)
        return 1
    if not main:
        return 0
    written = save_run(out, cfg, result)
    steps, loss = ("meta-steps", "meta-loss") if meta else ("steps", "loss")
    print(f"done: {len(result.history)} {steps} in {result.seconds:.1f}s, last {loss} {result.history[-1]['loss']:.3f}")
    print(f"wrote {out}/{', '.join(written)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg, model, options = load_run(Path(args.checkpoint))
    settings = {**options, **cfg.eval}  # the run's own inner loop, unless its eval section says otherwise
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

    t = sub.add_parser("train", help="train a model with a method (default: meta-training) from a YAML/JSON run config")
    t.add_argument("--config", help="run config (.yaml/.json), e.g. configs/mnist5k.yaml")
    t.add_argument("--method", choices=training_methods.methods(), metavar="NAME",
                   help=f"training method, one of {', '.join(training_methods.methods())} "
                        "(default: the config's method, else meta)")  # fmt: skip
    t.add_argument("--out", default="runs/latest", help="output directory (default: runs/latest)")
    c = t.add_argument_group("checkpoints (in OUT/checkpoints; SIGTERM/SIGINT save one and exit)")
    c.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in OUT (start if there is none); "
                        "without --config, reuse OUT/config.json")  # fmt: skip
    c.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=50, metavar="N",
                   help="write a checkpoint every N steps (default: 50)")  # fmt: skip
    c.add_argument("--keep-last", dest="keep_last", type=int, default=3, metavar="K",
                   help="checkpoint files to keep (default: 3)")  # fmt: skip
    g = t.add_argument_group("overrides of the config's meta section (every method's loop)")
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
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
