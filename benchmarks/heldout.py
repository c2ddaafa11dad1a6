"""Held-out attack benchmark: does meta-adversarial training make a model more robust to attacks it never
trained on, and at what cost, compared with the methods users would pick instead?

    python benchmarks/heldout.py --quick                                   # smoke: minutes on 2 CPU cores
    python benchmarks/heldout.py --protocol benchmarks/protocols/linf_heldout.yaml --seeds 0 1 2
    python benchmarks/heldout.py --protocol ... --data mnist --device cuda  # same script, full data, GPU
    python benchmarks/heldout.py --protocol ... --device cuda --jobs 12     # runs in parallel processes

Every method trains the same model on the same data for the same number of epochs; its wall-clock is recorded. The
last ``tune.examples`` (default 300) training digits are held out of training as a validation split
(``tune.scored_examples`` of them score each fine-tuning candidate; default: all but the support set). Each trained
model is attacked white-box in eval mode (held-out attacks, the training attacks, an eps sweep), adapted few-shot
with the attack re-run against the adapted model (docs/adaptation.md): at each shot count "sgd" and "bn_sgd" with
(steps, lr) chosen on the validation split from the ``tune`` grid, "bn" and "bn_mix" for every method, "matched"
(its own inner loop) for meta methods, "task_bn" for runs with per-type statistics; attacked zero-shot by the
protocol's ``reference_attacks`` (AutoAttack: stronger, too costly to re-run after every adaptation); and checked
for the sanity conditions of Carlini et al. 2019. One JSON per (method, seed) goes to --out; a markdown summary of
every JSON in --out is printed and saved. A run whose JSON exists is skipped, and training checkpoints and finished
evaluation stages go to --out/checkpoints/, so an interrupted benchmark resumes where it stopped with the numbers of
an uninterrupted one: a run stopped in training continues from its last checkpoint (bit for bit), one stopped in
evaluation from its last finished stage (--overwrite reruns from step 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from report import COMMON, write_summary

import metaadv as ma
from metaadv.eval import FINETUNE_GRID, InnerLoopSpec, tune_finetuning
from metaadv.training_methods import get
from metaadv.training_methods.meta import meta_config, settings_of

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROTOCOL = ROOT / "benchmarks" / "protocols" / "linf_heldout.yaml"
BASELINE_ATTACKS = {  # baseline -> which protocol attacks it trains on; any other baseline: train_attacks
    "erm": lambda p: [],
    "pgd_at": lambda p: [p["pgd_at_attack"]],
    "fast_at": lambda p: [p["fast_at_attack"]],
    "trades": lambda p: [p["pgd_at_attack"]],
}
QUICK = {"epochs": 1, "n_examples": 64, "sanity_examples": 48, "shots": [8], "train_examples": 512,
         "tune": {"examples": 48, "steps": [1, 3], "lr": [0.01]}}  # fmt: skip
# the validation split held out of the training data, the fine-tuning grid chosen from on it, and how many of
# its examples score each candidate (None: all but the support set)
TUNE = {"examples": 300, **{k: list(v) for k, v in FINETUNE_GRID.items()}, "scored_examples": None}
FINETUNING = ("sgd", "bn_sgd")  # their (steps, lr) chosen on the validation split
CHECKPOINT_EVERY = 50  # training steps between a run's checkpoints (out/checkpoints/)


def load_protocol(path: Path, quick: bool) -> dict[str, Any]:
    protocol = yaml.safe_load(path.read_text())
    if quick:
        protocol = {**protocol, **QUICK}
        protocol["held_out"] = protocol["held_out"][:3]
        protocol["eps_sweep"] = {k: v[:2] for k, v in list(protocol["eps_sweep"].items())[:1]}
    specs = [
        *protocol["train_attacks"],
        *protocol["held_out"],
        *protocol.get("reference_attacks", []),
        protocol["unbounded"],
        protocol["white_box"],
        protocol["black_box"],
        *(protocol.get(k) for k in ("pgd_at_attack", "fast_at_attack") if k in protocol),
    ]
    protocol.setdefault("eval_batch_size", 256)
    protocol["tune"] = {**TUNE, **protocol.get("tune", {})}
    if set(protocol["tune"]) != set(TUNE):
        raise ValueError(f"{path.name}: tune takes {sorted(TUNE)}, got {sorted(protocol['tune'])}")
    scored, room = protocol["tune"]["scored_examples"], protocol["tune"]["examples"] - max(protocol["shots"], default=0)
    if scored is not None and not (isinstance(scored, int) and 0 < scored <= room):
        raise ValueError(f"{path.name}: tune.scored_examples must be an integer in [1, {room}] (the validation "
                         f"examples beside the largest support set), got {scored!r}")  # fmt: skip
    for spec in specs:  # fail before any training on a typo
        ma.attacks.make(spec)
    for name, options in (protocol.get("baseline_variants") or {}).items():
        if options.get("method") not in baselines():
            raise ValueError(f"{path.name}: baseline variant {name!r} needs method: one of {baselines()}")
    return protocol


def baselines() -> list[str]:
    """The registered methods that are not meta methods."""
    return [m for m in ma.methods() if not get(m).meta]


def plan(method: str, protocol: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
    """``(registered method, its protocol attacks, its settings)`` for the protocol's name ``method``: a
    registered method (a meta method with the protocol's meta section), a meta variant (``meta`` with the
    variant's MetaConfig changes, and its own ``train_attacks`` if it names them) or a baseline variant (a
    baseline at the settings it names)."""
    meta_variants = protocol.get("meta_variants") or {}
    baseline_variants = protocol.get("baseline_variants") or {}  # name -> {method: ..., its settings}
    if method in meta_variants:
        options = dict(meta_variants[method])
        return "meta", options.pop("train_attacks", protocol["train_attacks"]), {**protocol["meta"], **options}
    options = dict(baseline_variants.get(method, {"method": method}))
    base = options.pop("method")
    if base not in ma.methods():
        raise ValueError(f"unknown method {method!r}; available: {[*ma.methods(), *meta_variants, *baseline_variants]}")
    if get(base).meta:
        return base, protocol["train_attacks"], dict(protocol["meta"])
    return base, BASELINE_ATTACKS.get(base, lambda p: p["train_attacks"])(protocol), options


def git_commit() -> str | None:
    """$METAADV_GIT_COMMIT if set (a tree copied to another machine may carry a stale .git), else HEAD."""
    if os.environ.get("METAADV_GIT_COMMIT"):
        return os.environ["METAADV_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict[str, str]:
    return {"metaadv": ma.__version__, "torch": torch.__version__, "python": platform.python_version()}


def load_data(protocol: dict[str, Any]) -> tuple[Any, Any]:
    """(train, test) of ``protocol["data"]``; the training set cut to ``train_examples`` when the protocol sets it."""
    train_data, test = ma.data.load(protocol["data"])
    if "train_examples" in protocol:
        train_data = ma.data.to_tensors(train_data, protocol["train_examples"])
    return train_data, test


def hardware(model: torch.nn.Module) -> dict[str, Any]:
    device = next(model.parameters()).device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}  # fmt: skip


def split_validation(train_data: Any, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """(training split, validation split): the validation split is the last ``n`` examples of ``train_data``
    (mnist5k's training digits are shuffled), held out of training and disjoint from the test digits."""
    x, y = ma.data.to_tensors(train_data)
    if not 0 < n < len(x):
        raise ValueError(f"tune.examples={n} must leave training examples: the training data has {len(x)}")
    return (x[:-n], y[:-n]), (x[-n:], y[-n:])


def training_config(method: str, protocol: dict, seed: int, device: str, steps: int | None = None) -> ma.MetaConfig:
    """The MetaConfig meta method ``method`` (see :func:`plan`) trains with under ``protocol``."""
    base, _, settings = plan(method, protocol)
    # the meta section may hold loop fields too (outer_lr, ...): MetaConfig splits them
    config = ma.MetaConfig(**settings, epochs=protocol["epochs"], steps=steps, seed=seed, device=device)
    return meta_config(base, config.loop, settings_of(base, config))


def train(method: str, protocol: dict, train_data, seed: int, device: str, steps: int | None = None,
          **checkpointing: Any) -> ma.TrainResult:  # fmt: skip
    """Train ``method`` (see :func:`plan`) as ``protocol`` says (its epochs, or ``steps`` optimizer steps when
    given): a meta method on meta-batches of the protocol's meta section, a baseline on ``batch_size``.
    ``checkpointing``: ``metaadv.train``'s ``checkpoint_dir``, ``resume``, ... (``learning_curves.py``)."""
    torch.manual_seed(seed)  # the model's initialization
    model = ma.models.build(protocol["model"])
    base, attacks, settings = plan(method, protocol)
    if get(base).meta:
        config = training_config(method, protocol, seed, device, steps)
        loop, settings = config.loop, settings_of(base, config)
        attacks = ma.AttackDistribution(attacks, seed=seed)
    else:
        loop = ma.LoopConfig(epochs=protocol["epochs"], steps=steps, batch_size=protocol["batch_size"], seed=seed,
                             device=device)  # fmt: skip
    return ma.train(base, model, train_data, attacks, loop=loop, progress=False, **checkpointing, **settings)


def sanity(model, test, protocol: dict, seed: int) -> dict[str, Any]:
    """Carlini et al. 2019 checks: accuracy falls with eps, an unbounded attack reaches ~0%, and black-box
    accuracy is not far below white-box accuracy (else gradients are masked)."""
    n = protocol["sanity_examples"]
    sweeps = {}
    for name, eps_list in protocol["eps_sweep"].items():
        specs = [f"{name}(eps={e}, steps=20)" for e in eps_list]
        report = ma.evaluate(model, test, specs, n_examples=n, seed=seed, batch_size=protocol["eval_batch_size"])
        sweeps[name] = {"eps": eps_list, "acc": [report.per_attack[ma.attacks.make(s).spec] for s in specs]}
    checks = ma.evaluate(model, test, [protocol["unbounded"], protocol["white_box"], protocol["black_box"]],
                         n_examples=n, seed=seed, batch_size=protocol["eval_batch_size"])  # fmt: skip
    acc = [checks.per_attack[ma.attacks.make(s).spec] for s in (protocol["unbounded"], protocol["white_box"],
                                                                  protocol["black_box"])]  # fmt: skip
    warnings = []
    for name, sweep in sweeps.items():
        if any(b > a + 0.02 for a, b in zip(sweep["acc"], sweep["acc"][1:], strict=False)):
            warnings.append(f"{name}: accuracy rises with eps {sweep['acc']} (attack too weak or masked gradients)")
    if acc[0] > 0.05:
        warnings.append(f"unbounded attack leaves {acc[0]:.1%} accuracy (expected ~0%): gradients may be masked")
    if acc[2] < acc[1] - 0.05:
        warnings.append(f"black-box {acc[2]:.1%} < white-box {acc[1]:.1%}: gradient masking")
    return {"eps_sweep": sweeps, "unbounded_acc": acc[0], "white_box_acc": acc[1], "black_box_acc": acc[2],
            "warnings": warnings}  # fmt: skip


def run_one(method: str, protocol: dict, seed: int, device: str, out: Path, fresh: bool = False) -> dict[str, Any]:
    """Train, evaluate and write ``out/<method>_seed<seed>.json``. Training checkpoints and the finished
    evaluation stages go to ``out/checkpoints/<method>_seed<seed>/`` and a later call resumes from them, with
    the same results as one uninterrupted call: a run stopped in training loses at most ``CHECKPOINT_EVERY``
    steps, one stopped in evaluation the stage it was in (``fresh``: delete them and start from step 0)."""
    train_data, test = load_data(protocol)
    train_data, val = split_validation(train_data, protocol["tune"]["examples"])
    work = out / "checkpoints" / f"{method}_seed{seed}"
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    try:
        result = train(method, protocol, train_data, seed, device, checkpoint_dir=work, resume=True, keep_last=1,
                       checkpoint_every=CHECKPOINT_EVERY)  # fmt: skip
    except ma.CheckpointError as e:
        raise ma.CheckpointError(f"{e} (heldout.py: --overwrite trains it afresh)") from None
    model, stage = result.model, Stages(work / "eval", {"protocol": protocol, "trained_steps": len(result.history)})
    opts = {"n_examples": protocol["n_examples"], "seed": seed, "batch_size": protocol["eval_batch_size"]}
    trained_on = stage("train_attacks", lambda: ma.evaluate(model, test, protocol["train_attacks"], **opts).to_dict())
    # Zero-shot numbers come with every adapted report (same evaluation examples whatever the shots), so
    # the held-out attacks run zero-shot once per shot count, not once more on their own.
    shots = {s: stage(f"{s}_shots", lambda s=s: few_shot(method, protocol, result, val, test, s, seed, device, opts))
             for s in protocol["shots"]}  # fmt: skip
    zero = next(iter(shots.values()))["report"] if shots else stage(
        "held_out", lambda: ma.evaluate(model, test, protocol["held_out"], **opts).to_dict())  # fmt: skip
    meta = {k: zero["meta"][k] for k in ("seed", "torch", "device", "batch_size")}  # not the adaptations'
    heldout = {**zero, "adapt_shots": 0, "adapted": {}, "adapted_union": {}, "adapted_clean": {}, "meta": meta}
    record = {
        "protocol": protocol["name"], "method": method, "seed": seed, "train_seconds": result.seconds,
        "heldout": heldout, "train_attacks": trained_on,
        "adapted": {str(s): {**v["adapted"], "adapted_clean": v["report"]["adapted_clean"]} for s, v in shots.items()},
        **stage("reference", lambda: reference(model, test, protocol, opts)),
        "validation": {"examples": len(val[1]), "scored_examples": protocol["tune"].get("scored_examples"),
                       "held_out_of": "the training data"},
        "sanity": stage("sanity", lambda: sanity(model, test, protocol, seed)),
        "eval_seconds": stage.seconds, "tune_seconds": sum(v["tune_seconds"] for v in shots.values()),
        "history": [{k: r[k] for k in ("step", "loss", "seconds", "task_names", "query_acc", "task_weights",
                                                 "query_acc_theta", "adaptation_gap") if k in r}
                    for r in result.history],
        "config": protocol, "versions": versions(), "git_commit": git_commit(), "hardware": hardware(model),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{method}_seed{seed}.json").write_text(json.dumps(record, indent=1))
    return record


class Stages:
    """The evaluation stages of a run that finished, one JSON each in ``directory``: calling it again for a
    stage saved under the same ``key`` (the protocol and the trained steps) returns the saved value instead of
    computing it, so a run stopped in evaluation resumes after its last finished stage. Every evaluation is
    seeded on its own (``metaadv.evaluate``), so a stage's value does not depend on the stages before it."""

    def __init__(self, directory: Path, key: dict[str, Any]) -> None:
        self.directory, self.key = directory, json.loads(json.dumps(key))
        self.seconds = 0.0  # the stages' wall-clock, saved ones included

    def __call__(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` (JSON types), or what an earlier call saved for ``name`` under this key."""
        path = self.directory / f"{name}.json"
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is None or saved["key"] != self.key:
            start = time.perf_counter()
            saved = {"key": self.key, "value": compute(), "seconds": 0.0}
            saved["seconds"] = time.perf_counter() - start
            self.directory.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp")  # a stop while writing leaves no truncated stage
            partial.write_text(json.dumps(saved))
            partial.replace(path)
            saved = json.loads(path.read_text())  # the same JSON types whether computed now or earlier
        self.seconds += saved["seconds"]
        return saved["value"]


def reference(model: torch.nn.Module, test: Any, protocol: dict, opts: dict[str, Any]) -> dict[str, Any]:
    """``{"reference": report}``: the model zero-shot under the protocol's ``reference_attacks`` (stronger,
    independent ones such as AutoAttack, too costly to re-run after every adaptation) on the same test digits as
    the held-out attacks; ``{}`` when the protocol names none."""
    if not protocol.get("reference_attacks"):
        return {}
    return {"reference": ma.evaluate(model, test, protocol["reference_attacks"], **opts).to_dict()}


def few_shot(method: str, protocol: dict, result: ma.TrainResult, val: Any, test: Any, shots: int, seed: int,
             device: str, opts: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """At ``shots`` support examples: the held-out ``report`` (zero-shot and with every adaptation, see
    ``adaptations``), the fine-tuning methods' (steps, lr) chosen on the validation split first; the record's
    ``adapted`` entry; the tuning's seconds (``tune_seconds``). JSON types."""
    grid = {k: protocol["tune"][k] for k in ("steps", "lr")}
    t = time.perf_counter()  # the held-out attacks on the validation digits choose each (steps, lr)
    tuned = {m: tune_finetuning(result.model, val, protocol["held_out"], shots, grid, method=m, seed=seed,
                                n_examples=protocol["tune"].get("scored_examples"),
                                batch_size=protocol["eval_batch_size"]) for m in FINETUNING}  # fmt: skip
    seconds = time.perf_counter() - t
    r = ma.evaluate(result.model, test, protocol["held_out"], adapt_shots=shots,
                    finetune={m: (c.steps, c.lr) for m, c in tuned.items()},
                    **adaptations(method, protocol, result, seed, device), **opts)  # fmt: skip
    adapted = {"adapted": r.adapted, "adapted_union": r.adapted_union, "finetune": r.meta["finetune"],
               "tuning": {m: c.to_dict() for m, c in tuned.items()},
               **({"matched": r.meta["matched"]} if "matched" in r.meta else {})}  # fmt: skip
    return {"report": r.to_dict(), "adapted": adapted, "tune_seconds": seconds}


def adaptations(method: str, protocol: dict, result: ma.TrainResult, seed: int, device: str) -> dict[str, Any]:
    """``evaluate``'s adaptation settings for a trained run: the common adaptations; a meta method's own inner
    loop ("matched"); a run with per-type BatchNorm statistics (MetaConfig.task_bn) also the nearest type's."""
    methods, settings = list(COMMON), {}
    if is_meta(method, protocol):
        config = training_config(method, protocol, seed, device)
        methods.append("matched")
        settings["inner_loop"] = InnerLoopSpec.from_config(config, result.artifacts)
    if result.artifacts.get("task_bn") is not None:
        methods.append("task_bn")
        settings["task_bn"] = result.artifacts["task_bn"]
    return {"adapt_methods": tuple(methods), **settings}


def is_meta(method: str, protocol: dict[str, Any]) -> bool:
    """Whether the protocol's method ``method`` (see :func:`plan`) is meta-trained."""
    return get(plan(method, protocol)[0]).meta


def run_parallel(args: argparse.Namespace, runs: list[tuple[int, str]], out: Path) -> None:
    """One subprocess per (seed, method), ``args.jobs`` at a time, CPU threads shared among them (unless
    OMP_NUM_THREADS is set). On one GPU, run NVIDIA MPS (``nvidia-cuda-mps-control -d``) so the processes'
    kernels run concurrently instead of time-slicing the device."""
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs)), **os.environ}
    base = [sys.executable, __file__, "--protocol", str(args.protocol), "--device", args.device, "--out", str(out)]
    base += ["--no-summary", *(["--quick"] if args.quick else []), *(["--data", args.data] if args.data else [])]
    base += ["--overwrite"] if args.overwrite else []
    base += ["--shots", *map(str, args.shots)] if args.shots is not None else []
    base += ["--examples", str(args.examples)] if args.examples is not None else []
    start = time.perf_counter()

    def one(run: tuple[int, str]) -> int:
        seed, method = run
        proc = subprocess.run([*base, "--seeds", str(seed), "--methods", method], env=env, capture_output=True,
                              text=True)  # fmt: skip
        tail = (proc.stdout.strip().splitlines() or [""])[-1] if proc.returncode == 0 else proc.stderr[-2000:]
        print(f"[{time.perf_counter() - start:7.0f}s] {method} seed {seed}: {tail}", flush=True)
        return proc.returncode

    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [run for run, rc in zip(runs, pool.map(one, runs), strict=True) if rc != 0]
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {failed}")


def status(protocol: dict[str, Any], seeds: list[int], methods: list[str], out: Path) -> list[str]:
    """One line per (seed, method) of ``out``: done (its JSON exists), how far its training and evaluation got
    (its checkpoints and finished stages), or not started."""
    n_train = len(ma.data.to_tensors(load_data(protocol)[0])[1]) - protocol["tune"]["examples"]
    lines = []
    for seed in seeds:
        for method in methods:
            name, work = f"{method}_seed{seed}", out / "checkpoints" / f"{method}_seed{seed}"
            latest = ma.checkpoint.latest_checkpoint(work) if work.is_dir() else None
            if (out / f"{name}.json").exists():
                lines.append(f"{name}: done")
            elif latest is None:
                lines.append(f"{name}: not started")
            else:
                batch = protocol["batch_size"]
                if is_meta(method, protocol):
                    batch = training_config(method, protocol, seed, "cpu").loop.batch_size
                stages = sorted(p.stem for p in (work / "eval").glob("*.json"))
                lines.append(f"{name}: trained {latest[1]['step']}/{protocol['epochs'] * (n_train // batch)} steps"
                             + (f", evaluated: {', '.join(stages)}" if stages else ""))  # fmt: skip
    return lines


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts that must be >= 1 (the benchmark scripts' --examples, --jobs, ...)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", type=Path, default=DEFAULT_PROTOCOL, help="a YAML protocol (benchmarks/protocols)")
    p.add_argument("--quick", action="store_true",
                   help="1 epoch on 512 digits (48 of them the validation split), 64 test digits, 8 shots")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--methods", nargs="+", help="subset of the protocol's methods")
    p.add_argument("--data", help="override the protocol's dataset (e.g. mnist, with torchvision)")
    p.add_argument("--shots", type=int, nargs="*", help="override the protocol's few-shot sizes (none: zero-shot only)")
    p.add_argument("--examples", type=positive_int, help="override n_examples and sanity_examples (test digits)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/<protocol>[_quick]")
    p.add_argument("--jobs", type=positive_int, default=1, help="(seed, method) runs in parallel processes")
    p.add_argument("--overwrite", action="store_true", help="rerun runs whose JSON already exists")
    p.add_argument("--status", action="store_true", help="say how far each run got (done, trained steps, "
                   "finished evaluation stages) and exit")  # fmt: skip
    p.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    protocol = load_protocol(args.protocol, args.quick)
    if args.data:
        protocol["data"] = args.data
    if args.shots is not None:
        protocol["shots"] = args.shots
    if args.examples is not None:
        protocol["n_examples"] = protocol["sanity_examples"] = args.examples
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    methods = args.methods or protocol["methods"]
    out = args.out or ROOT / "benchmarks" / "results" / (protocol["name"] + ("_quick" if args.quick else ""))
    if args.status:
        print("\n".join(status(protocol, seeds, methods, out)))
        return
    runs = [(s, m) for s in seeds for m in methods if args.overwrite or not (out / f"{m}_seed{s}.json").exists()]
    if len(runs) < len(seeds) * len(methods):
        print(f"{len(seeds) * len(methods) - len(runs)} runs already in {out}: skipped (--overwrite reruns them)")
    if args.jobs > 1 and len(runs) > 1:
        run_parallel(args, runs, out)
        runs = []
    start = time.perf_counter()
    for seed, method in runs:
        t = time.perf_counter()
        r = run_one(method, protocol, seed, args.device, out, fresh=args.overwrite)
        print(f"[{time.perf_counter() - start:7.0f}s] {method} seed {seed}: held-out union "
              f"{r['heldout']['union_acc']:.1%}, clean {r['heldout']['clean_acc']:.1%}, "
              f"train {r['train_seconds']:.0f}s (run {time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip
    if args.no_summary:
        return
    print(f"\n{write_summary(out)}\nwrote {out}/*.json and summary.md")


if __name__ == "__main__":
    sys.exit(main())
