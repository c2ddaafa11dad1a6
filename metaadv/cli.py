"""The ``metaadv`` command: ``metaadv train [--method NAME] --config FILE``, ``metaadv eval --checkpoint RUN`` (or
``--model pkg.mod:factory``) and ``metaadv compare RUN [RUN ...]``.

``torchrun --nproc_per_node N -m metaadv.cli train --config FILE`` trains with the tasks of each meta-batch
split over N processes (docs/scaling.md); only rank 0 prints and writes the output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__, data, distributed, models, training_methods
from .attacks import make
from .checkpoint import list_checkpoints, load_tensors
from .config import RunConfig, load_run_config
from .engine import NonFiniteLossError, TrainingInterrupted, resolve_device
from .engine.tensorboard import log_report
from .eval import ADAPT_METHODS, InnerLoopSpec, RobustnessReport, evaluate, external
from .eval.adaptation import BN_METHODS
from .eval.compare import comparison_summary, comparison_table
from .meta import options as meta_options
from .runs import load_run, read_run_config, save_run, write_config, write_history, write_json
from .tasks import AttackDistribution
from .training_methods import meta as meta_methods

log = logging.getLogger("metaadv")


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
        cfg = read_run_config(out / "config.json", overrides)
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
    # recorded in config.json's run section, where a later `metaadv eval` finds the run's TensorBoard directory
    run = {"tensorboard": str(Path(args.tensorboard).resolve())} if args.tensorboard is not None else {}
    if main and not (args.resume and (out / "config.json").is_file()):  # a resume rewrites it once it matches
        write_config(out, cfg, status="running", **run)
    try:
        result = training_methods.train(
            cfg.method, model, train, attacks, loop=cfg.meta.loop, progress=not args.quiet,
            checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
            resume=args.resume, tensorboard=args.tensorboard, **settings,
        )  # fmt: skip
    except TrainingInterrupted as e:
        if main:
            write_history(out, e.history)
            write_config(out, cfg, status=f"interrupted after step {e.step}", **run)
            world = distributed.world_size()
            launcher = f"torchrun --nproc_per_node {world} -m metaadv.cli" if world > 1 else "metaadv"
            print(f"metaadv train: {e}; continue with: {launcher} train --out {out} --resume", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLossError as e:
        if main:
            write_history(out, e.history)
            write_config(out, cfg, status="failed: non-finite loss", **run)
            print(f"metaadv train: error: {e}", file=sys.stderr)
        return 1
    if not main:
        return 0
    written = save_run(out, cfg, result, **run)
    steps, loss = ("meta-steps", "meta-loss") if meta else ("steps", "loss")
    print(f"done: {len(result.history)} {steps} in {result.seconds:.1f}s, last {loss} {result.history[-1]['loss']:.3f}")
    print(f"wrote {out}/{', '.join(written)}")
    return 0


def _eval_settings(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with what the command line sets: attacks, n_examples, adapt_shots, adapt_methods, seed."""
    settings = dict(settings)
    if args.attacks:
        settings["attacks"] = args.attacks
    for key in ("n_examples", "adapt_shots", "adapt_methods", "seed"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def _report(model: torch.nn.Module, test: Any, settings: dict[str, Any], out: Path, quiet: bool,
            source: dict[str, Any] | None = None) -> RobustnessReport:  # fmt: skip
    """Evaluate, print the table and write ``out/report.json`` (its ``meta.source``: what ``--model`` loaded):
    the one report of both forms of ``metaadv eval``."""
    start = time.perf_counter()
    report = evaluate(model, test, settings.pop("attacks"), progress=not quiet, **settings)
    if source is not None:
        report = dataclasses.replace(report, meta={**report.meta, "source": source})
    print(report.to_markdown())
    print(f"\n({report.n_examples} test examples, {time.perf_counter() - start:.1f}s)")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report.to_json())
    print(f"wrote {out}/report.json")
    return report


def _eval_run(args: argparse.Namespace) -> int:
    """``metaadv eval --checkpoint RUN``: the run's model, data and inner loop; its config's eval section."""
    for flag, value in (("--weights", args.weights), ("--data", args.data), ("--data-root", args.data_root)):
        if value is not None:
            raise ValueError(
                f"{flag} goes with --model: the run directory {args.checkpoint} has its own weights and data"
            )
    cfg, model, options = load_run(Path(args.checkpoint))
    settings = _eval_settings(args, {**options, **cfg.eval})  # the run's own inner loop, unless eval: says otherwise
    if "matched" in settings.get("adapt_methods", ()) and training_methods.get(cfg.method).meta:
        settings["inner_loop"] = _inner_loop(Path(args.checkpoint), cfg, model)  # else evaluate says it has none
    if not settings.get("attacks"):
        raise ValueError("no attacks to evaluate: pass --attacks or give eval.attacks in the run config")
    _, test = data.load(cfg.data, cfg.data_root)
    report = _report(model, test, settings, Path(args.out or args.checkpoint), args.quiet)
    run = json.loads((Path(args.checkpoint) / "config.json").read_text()).get("run", {})
    if run.get("tensorboard"):  # the run was logged to TensorBoard: its evaluation goes beside its curves
        steps = len((Path(args.checkpoint) / "history.jsonl").read_text().splitlines())
        log_report(run["tensorboard"], report, steps)
        print(f"logged the report to TensorBoard in {run['tensorboard']} at step {steps}")
    return 0


def _inner_loop(run: Path, cfg: RunConfig, model: torch.nn.Module) -> InnerLoopSpec:
    """The inner loop a meta run was trained with: its config's, with the artifacts of its ``meta_state.pt``
    (Meta-SGD's step sizes, per-step BatchNorm statistics)."""
    path = run / "meta_state.pt"
    saved = load_tensors(path, "meta state") if path.is_file() else {}
    return InnerLoopSpec.from_config(cfg.meta, meta_options.load_artifacts(model, saved))


def _eval_model(args: argparse.Namespace) -> int:
    """``metaadv eval --model SPEC [--weights FILE] --data NAME_OR_FILE --attacks ...``: a model of the user's."""
    if not args.attacks:
        raise ValueError("--model needs --attacks: a model of your own has no run config to take them from")
    if args.data is None:
        raise ValueError(f"--model needs --data: a dataset ({', '.join(data.NAMES)}) or a torch.save file of (x, y)")
    model = external.load_model(args.model, args.weights)
    x, y = external.load_data(args.data, args.data_root)
    external.check_compatible(model, x, y, model_name=f"the model {args.model}", data_name=f"the data {args.data}")
    settings = _eval_settings(args, {})
    adapts_bn = [m for m in settings.get("adapt_methods", ()) if m in BN_METHODS] if settings.get("adapt_shots") else []
    if isinstance(model, external.TorchScriptModel) and adapts_bn:
        raise ValueError(
            f"adapt method {' and '.join(map(repr, adapts_bn))} needs the model's Python modules, but {args.model} is "
            "TorchScript (its BatchNorm layers cannot be set to training mode on their own): use --adapt-methods sgd, "
            "or give the model as package.module:factory with --weights"
        )
    source = {"model": args.model, "weights": args.weights, "data": args.data}
    _report(model, (x, y), settings, Path(args.out or "."), args.quiet, source)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    return _eval_run(args) if args.model is None else _eval_model(args)


def cmd_compare(args: argparse.Namespace) -> int:
    """``metaadv compare RUN [RUN ...]``: every run evaluated on the same attacks, test examples and adaptations
    (the first run's eval section with the command's overrides; each run adapts with its own inner loop), then
    one table of them side by side and a sentence saying what it shows."""
    paths = [Path(r) for r in args.runs]
    names = args.names or [p.name for p in paths]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"--names must give one distinct name per run ({len(paths)}), got {names}")
    runs = {name: load_run(p) for name, p in zip(names, paths, strict=True)}
    first = next(iter(runs.values()))[0]
    if len({(cfg.data, cfg.data_root) for cfg, _, _ in runs.values()}) > 1:
        raise ValueError("the runs were trained on different data: compare runs of one dataset")
    shared = _eval_settings(args, first.eval)
    if not shared.get("attacks"):
        raise ValueError(f"no attacks to evaluate: pass --attacks or give eval.attacks in {paths[0]}'s config")
    _, test = data.load(first.data, first.data_root)
    reports, seconds = {}, {}
    for (name, (_, model, own)), path in zip(runs.items(), paths, strict=True):
        print(f"evaluating {name} ({path})")
        settings = {**own, **shared}
        reports[name] = evaluate(model, test, settings.pop("attacks"), progress=not args.quiet, **settings)
        seconds[name] = float(json.loads((path / "config.json").read_text())["run"].get("train_seconds", 0.0))
    text = f"{comparison_table(reports, seconds)}\n\n{comparison_summary(reports)}"
    print(f"\n{text}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", json.dumps({n: r.to_dict() for n, r in reports.items()}, indent=2))
    write_json(out / "compare.md", text + "\n")
    print(f"wrote {out}/compare.json, compare.md")
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
    t.add_argument("--tensorboard", metavar="DIR",
                   help="log the run to TensorBoard in DIR (needs `pip install tensorboard`; view with "
                        "`tensorboard --logdir DIR`); the same DIR with --resume continues its curves")  # fmt: skip
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run, or any classifier, against attacks (prints a table, "
                                     "writes report.json)")  # fmt: skip
    m = e.add_argument_group("the model: a run directory (--checkpoint), or a classifier metaadv did not train")
    which = m.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="RUN", help="a `metaadv train` output directory")
    which.add_argument("--model", metavar="SPEC",
                       help="'package.module:factory' (called with no arguments; a module file in the current "
                            "directory works), or a TorchScript file (.pt/.pth/.ts; it has its weights)")  # fmt: skip
    m.add_argument("--weights", metavar="FILE",
                   help="with --model package.module:factory: its state dict, a torch.save file (read with "
                        "weights_only=True) or a .safetensors file (pip install 'metaadv[io]')")  # fmt: skip
    m.add_argument("--data", metavar="NAME_OR_FILE",
                   help=f"with --model: a dataset ({', '.join(data.NAMES)}: its test split) or a torch.save file of "
                        "(x, y) or {'x': x, 'y': y}: images (N, C, H, W) float in [0, 1], labels (N,)")  # fmt: skip
    m.add_argument("--data-root", dest="data_root", metavar="DIR", help="with --model: torchvision's data directory")
    e.add_argument("--attacks", nargs="+", help="attack specs (required with --model; default: the run config's "
                                                "eval.attacks)")  # fmt: skip
    e.add_argument("--n-examples", dest="n_examples", type=int)
    e.add_argument("--adapt-shots", dest="adapt_shots", type=int)
    e.add_argument("--adapt-methods", dest="adapt_methods", nargs="+", choices=ADAPT_METHODS, metavar="METHOD",
                   help=f"adaptations with --adapt-shots, of {', '.join(ADAPT_METHODS)} (default: sgd, or the run "
                        "config's eval.adapt_methods; matched: a meta run's own inner loop)")  # fmt: skip
    e.add_argument("--seed", type=int)
    e.add_argument("--out", help="where to write report.json (default: the checkpoint directory; with --model, the "
                                 "current directory)")  # fmt: skip
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=cmd_eval)

    k = sub.add_parser("compare", help="evaluate several runs on the same attacks and adaptations, side by side")
    k.add_argument("runs", nargs="+", metavar="RUN", help="`metaadv train` output directories")
    k.add_argument("--names", nargs="+", help="a name per run for the table (default: the directories' names)")
    k.add_argument("--attacks", nargs="+", help="attack specs (default: the first run's eval.attacks)")
    k.add_argument("--n-examples", dest="n_examples", type=int)
    k.add_argument("--adapt-shots", dest="adapt_shots", type=int)
    k.add_argument("--adapt-methods", dest="adapt_methods", nargs="+", metavar="METHOD",
                   choices=[m for m in ADAPT_METHODS if m != "matched"])  # fmt: skip  # matched: in metaadv eval
    k.add_argument("--seed", type=int)
    k.add_argument("--out", default=".", help="where to write compare.json and compare.md (default: .)")
    k.add_argument("--quiet", action="store_true", help="no progress bar")
    k.set_defaults(run=cmd_compare)
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
