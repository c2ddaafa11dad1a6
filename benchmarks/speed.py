"""Speed of a meta-step against its peers and its floor, measured side by side in one run.

    python benchmarks/speed.py            # full: ~5 minutes on 2 CPU cores
    python benchmarks/speed.py --quick    # a smoke run in well under a minute
    python benchmarks/speed.py --ops      # also the kernel launches and host syncs per step (+ ~15 minutes on CPU)
    python benchmarks/speed.py --only compile   # attack calls eager vs torch.compile (~7 minutes on 2 CPU cores)
    python benchmarks/speed.py --device cuda --compile  # everything, with compiled and CUDA-graph attacks

Prints markdown tables and writes benchmarks/results/speed_<device>[_<only>].json and a scaling plot beside it:
- metaadv's meta-step (looped over tasks, `batched=False`) vs its task-batched execution
  (`MetaConfig(batched=True)`: one attack call for all tasks, vmap over the inner loop and query loss) vs
  the same algorithm written with `higher` (innerloop_ctx) and as a plain loop of torch.autograd calls over
  `functional_call`, and a PGD-AT step on as many examples; every variant crafts the same attacks (native PGD
  against the meta-parameters) and takes one Adam step; ratios to the looped metaadv step and to the floor.
  Options timed beside them: the attacks under bf16 autocast (`autocast_attacks`), adversarial-example reuse
  (`reuse_every=4`, per meta-step averaged over one crafting and three reusing steps) and, with ``--compile``,
  compiled attacks (`compile_attacks="compile"`, looped and batched; `"cudagraphs"` batched, on CUDA).
- native PGD vs torchattacks PGD, images per second at equal steps.
- efficiency vs the floor: the meta-step divided by the forward/backward passes it must do
  (attack steps + inner steps + query pass) timed alone.
- scaling: meta-step time (looped and batched) vs tasks (1..16) and vs inner steps (1..5), with the memory
  the autograd graph of the looped step holds for the meta-backward (and the CUDA peak on a GPU).
- with ``--compile``: one attack call (PGD-5 and PGD-10 on 64 and 512 examples, SmallCNN in training mode
  through functional parameters, as meta-training calls it) eager vs `compile_attacks` modes: steady-state
  seconds per call and the first call's extra time (compilation; Inductor's caches in a fresh directory unless
  TORCHINDUCTOR_CACHE_DIR is set), with dynamo's graph, graph-break and CUDA-graph-skip counts.
- with ``--ops``: the kernel launches and host syncs of one step (pgd_at, meta looped, meta batched; 1..32
  tasks), counted on CPU whatever ``--device`` is (``benchmarks/op_count.py``), in the JSON under ``ops``.
Timings are medians over interleaved repeats (variants alternate), after warm-up. ``--only`` runs some sections;
the JSON is written after each section, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import higher
import op_count  # benchmarks/op_count.py: launches and host syncs of a step, counted on CPU
import torch
import torch.nn.functional as F
import torchattacks

import metaadv as ma
from metaadv.attacks.compiled import compiled_attacks
from metaadv.attacks.spec import run_grouped
from metaadv.engine import resolve_device
from metaadv.functional import call, clone_buffers, model_fn, state
from metaadv.meta import meta_batch_loss
from metaadv.meta.options.reuse import AdversarialPool
from metaadv.models import SmallCNN
from metaadv.tasks import split_support_query
from metaadv.training_methods.adversarial import attack_losses

EPS, INNER_LR = 0.3, 0.01
REUSE = 4  # reuse_every of the reuse variant
SECTIONS = ("peers", "pgd", "scaling", "compile", "ops")


class Bench:
    """One workload: a model, a meta-batch of clean data, a PGD attack, and the variants to time."""

    def __init__(self, device: torch.device, tasks: int, shots: int, steps: int, inner: int) -> None:
        torch.manual_seed(0)
        self.device, self.tasks, self.shots, self.inner = device, tasks, shots, inner
        train, _ = ma.data.load("mnist5k")
        n = tasks * 2 * shots
        self.x, self.y = train.x[:n].to(device), train.y[:n].to(device)
        self.model = SmallCNN().to(device).train()
        self.params, self.buffers = state(self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.spec = f"pgd_linf(eps={EPS}, steps={steps})"
        self.attack = ma.attacks.make(self.spec)
        self.dist = ma.AttackDistribution([self.spec], seed=0)
        self.cfg = ma.MetaConfig(tasks_per_batch=tasks, support_size=shots, query_size=shots, sample_replace=True,
                                 inner_steps=inner, inner_lr=INNER_LR, batched=False)  # fmt: skip
        self.metaadv, self.metaadv_batched = self.meta_step(), self.meta_step(batched=True)  # looped, task-batched

    def meta_step(self, **options: object) -> Callable[[], None]:
        """One metaadv meta-step with ``MetaConfig`` options changed (``batched=True``, ``compile_attacks=...``)."""
        cfg = dataclasses.replace(self.cfg, **options)
        return lambda: self.update(meta_batch_loss(self.model, self.params, self.buffers,
                                                   self.dist.sample(self.tasks), self.x, self.y, cfg).loss)  # fmt: skip

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def pgd_at(self) -> None:
        """A PGD-AT step (the library's loss: attack with scratch BatchNorm statistics, then one forward) on all
        ``tasks * 2 * shots`` examples with the same attack."""
        self.update(attack_losses(self.model, [self.attack], self.x, self.y).mean())

    def metaadv_reuse(self, every: int = REUSE) -> None:
        """``every`` meta-steps with ``reuse_every=every``: one crafts the sets, the others reuse them."""
        pool, cfg = AdversarialPool(every, self.device), dataclasses.replace(self.cfg, reuse_every=every)
        for step in range(every):
            self.update(meta_batch_loss(self.model, self.params, self.buffers, self.dist.sample(self.tasks),
                                        self.x, self.y, cfg, step=step, options=[pool]).loss)  # fmt: skip

    def _chunks(self):
        target = model_fn(self.model, self.params, self.buffers)
        for xs, ys, xq, yq in split_support_query(self.x, self.y, self.tasks, self.shots, self.shots):
            adv = self.attack(target, torch.cat([xs, xq]), torch.cat([ys, yq]))
            yield adv[: self.shots], ys, adv[self.shots :], yq

    def higher_loop(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        inner_opt = torch.optim.SGD(self.model.parameters(), lr=INNER_LR)
        for xs, ys, xq, yq in list(self._chunks()):
            with higher.innerloop_ctx(self.model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(self.inner):
                    diffopt.step(F.cross_entropy(fmodel(xs), ys))
                (F.cross_entropy(fmodel(xq), yq) / self.tasks).backward()
        self.opt.step()

    def plain_loop(self) -> None:
        losses = []
        for xs, ys, xq, yq in list(self._chunks()):
            fast, scratch = dict(self.params), clone_buffers(self.buffers)
            for _ in range(self.inner):
                loss = F.cross_entropy(call(self.model, fast, scratch, xs), ys)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {k: p - INNER_LR * g for (k, p), g in zip(fast.items(), grads, strict=True)}
            losses.append(F.cross_entropy(call(self.model, fast, self.buffers, xq), yq))
        self.update(torch.stack(losses).mean())

    def floor(self) -> None:
        """The passes a meta-step must make, without the meta-learning machinery: per task, the attack's
        forward/backward passes on support+query, then `inner` forward/backward passes on the support
        set, then one forward/backward on the query set (first-order cost; no graph through the inner step)."""
        attack_steps = self.attack.params["steps"]
        for xs, ys, xq, yq in split_support_query(self.x, self.y, self.tasks, self.shots, self.shots):
            xa = torch.cat([xs, xq]).requires_grad_()
            for _ in range(attack_steps):
                torch.autograd.grad(F.cross_entropy(self.model(xa), torch.cat([ys, yq])), xa)
            for _ in range(self.inner):
                F.cross_entropy(self.model(xs), ys).backward()
            F.cross_entropy(self.model(xq), yq).backward()
        self.model.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def graph_memory_mb(b: Bench) -> float:
    """Bytes the autograd graph of one meta-step saves for its backward pass (unique storages), in MiB:
    what grows with tasks and inner steps, independent of the allocator (CPU RSS cannot isolate it)."""
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = meta_batch_loss(b.model, b.params, b.buffers, b.dist.sample(b.tasks), b.x, b.y, b.cfg).loss
    b.update(loss)
    return sum(saved.values()) / 2**20


def scaling_row(device: torch.device, tasks: int, shots: int, steps: int, inner: int, repeats: int) -> dict:
    b = Bench(device, tasks, shots, steps, inner)
    med = time_side_by_side({"looped": b.metaadv, "batched": b.metaadv_batched}, repeats, device)
    row = {"tasks": tasks, "inner_steps": inner, "seconds": med["looped"], "batched_seconds": med["batched"],
           "graph_mb": graph_memory_mb(b)}  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        b.metaadv()
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(f"| {tasks} | {inner} | {med['looped']:.3f} | {med['batched']:.3f} | {row['graph_mb']:.0f} | "
          f"{row.get('cuda_peak_mb', float('nan')):.0f} |")  # fmt: skip
    return row


def pgd_throughput(device: torch.device, n: int, steps: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    _, test = ma.data.load("mnist5k")
    x, y = test.x[:n].to(device), test.y[:n].to(device)
    model = SmallCNN().to(device).eval()
    alpha = 2.5 * EPS / steps
    native = ma.attacks.make(f"pgd_linf(eps={EPS}, steps={steps}, alpha={alpha})")
    theirs = torchattacks.PGD(model, eps=EPS, alpha=alpha, steps=steps, random_start=True)
    med = time_side_by_side({"native": lambda: native(model, x, y), "torchattacks": lambda: theirs(x, y)},
                            repeats, device)  # fmt: skip
    return {f"{k}_img_per_s": n / v for k, v in med.items()}


def plot_scaling(result: dict, path: Path) -> None:
    """Seconds per meta-step (looped and batched) and graph memory vs tasks and vs inner steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, x in ((axes[0], "scaling_tasks", "tasks"), (axes[1], "scaling_inner", "inner_steps")):
        rows = result[key]
        xs = [r[x] for r in rows]
        ax.plot(xs, [r["seconds"] for r in rows], "o-", label="looped (s)")
        ax.plot(xs, [r["batched_seconds"] for r in rows], "s--", label="batched (s)")
        ax.set(xlabel=x.replace("_", " "), ylabel="seconds per meta-step")
        mem = ax.twinx()
        mem.plot(xs, [r["graph_mb"] for r in rows], "^:", color="gray", label="autograd graph (MiB)")
        mem.set_ylabel("MiB")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"meta-step scaling ({result['device']}, {result['threads']} threads)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ops_table(quick: bool, shots: int, steps: int) -> dict:
    """Print and return ``op_count.op_table`` at the timed sizes: variant -> tasks -> {ops, syncs, ratio, ...}."""
    tasks = (1, 2) if quick else (1, 2, 4, 8, 16, 32)
    attack = f"pgd_linf(eps={EPS}, steps={steps})"
    table = op_count.op_table(tasks, shots, attack)
    print(f"\n## Kernel launches and host syncs per step (counted on CPU; {shots}+{shots} per task, {attack})\n")
    print("\n".join(op_count.markdown(table, shots)))
    return table


def compile_rows(device: torch.device, n: int, steps: tuple[int, ...], repeats: int) -> list[dict]:
    """One attack call on ``n`` examples, eager vs each compile mode, against SmallCNN in training mode through
    functional parameters (as meta-training calls it). A row per attack: ``eager_seconds``, ``<mode>_seconds``
    (steady), ``<mode>_speedup``, ``<mode>_compile_seconds`` (its first call minus its steady call) and counts."""
    torch._dynamo.reset()  # every size compiles afresh, static, as a fixed-shape training run would
    torch.manual_seed(0)
    train, _ = ma.data.load("mnist5k")
    x, y = train.x[:n].to(device), train.y[:n].to(device)
    model = SmallCNN().to(device).train()
    target = model_fn(model, *state(model))
    attacks = {k: ma.attacks.make(f"pgd_linf(eps={EPS}, steps={k})") for k in steps}

    def run(mode: str, k: int) -> None:
        with compiled_attacks(mode):
            run_grouped([attacks[k]], target, [x], [y])

    modes = ("compile", "cudagraphs") if device.type == "cuda" else ("compile",)
    calls = {(mode, k): functools.partial(run, mode, k) for mode in ("off", *modes) for k in steps}
    first, counts = {}, {}
    c = torch._dynamo.utils.counters
    for mode in ("off", *modes):  # each mode's first calls: compilation (or CUDA graph recording) + run
        c.clear()
        for k in steps:
            sync(device)
            start = time.perf_counter()
            calls[mode, k]()
            sync(device)
            first[mode, k] = time.perf_counter() - start
        counts[mode] = {"graphs": c["stats"]["unique_graphs"], "graph_breaks": sum(c["graph_break"].values()),
                        "cudagraph_skips": c["inductor"]["cudagraph_skips"]}  # fmt: skip
    med = time_side_by_side({f"{m}/{k}": fn for (m, k), fn in calls.items()}, repeats, device)
    rows = []
    for k in steps:
        row = {"examples": n, "attack_steps": k, "eager_seconds": med[f"off/{k}"]}
        for mode in modes:
            row |= {f"{mode}_seconds": med[f"{mode}/{k}"], f"{mode}_speedup": med[f"off/{k}"] / med[f"{mode}/{k}"],
                    f"{mode}_compile_seconds": first[mode, steps[0]] - med[f"{mode}/{steps[0]}"],
                    **{f"{mode}_{key}": v for key, v in counts[mode].items()}}  # fmt: skip
        rows.append(row)
    return rows


def compile_table(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    """Print and return :func:`compile_rows` for PGD-5/10 on 64 and 512 examples (PGD-2 on 16 and 32 with quick)."""
    sizes, steps = ((16, 32), (2,)) if quick else ((64, 512), (5, 10))
    modes = ("compile", "cudagraphs") if device.type == "cuda" else ("compile",)
    print(f"\n## Attack calls: eager vs {' vs '.join(modes)} (SmallCNN, training mode, functional params, {device}, "
          f"median of {repeats}; compilation = first call - steady call, per batch size)\n")  # fmt: skip
    head = " | ".join(f"{m} (s) | speedup | {m}: compiling (s)" for m in modes)
    print(f"| examples | attack | eager (s) | {head} | graphs / breaks / CUDA graph skips |\n|---:|---|---:|"
          + "---:|---:|---:|" * len(modes) + "---|")  # fmt: skip
    rows = [r for n in sizes for r in compile_rows(device, n, steps, repeats)]
    for r in rows:
        cells = [f"{r[f'{m}_seconds']:.4f} | {r[f'{m}_speedup']:.2f} | {r[f'{m}_compile_seconds']:.1f}" for m in modes]
        counts = ", ".join(f"{r[f'{m}_graphs']} / {r[f'{m}_graph_breaks']} / {r[f'{m}_cudagraph_skips']}"
                           for m in modes)  # fmt: skip
        print(f"| {r['examples']} | PGD-{r['attack_steps']} | {r['eager_seconds']:.4f} | {' | '.join(cells)} | "
              f"{counts} |")  # fmt: skip
    return rows


def peers(b: Bench, device: torch.device, repeats: int, compile_variants: bool) -> dict[str, float]:
    """Print and return the median seconds of the meta-step variants, its peers and the floor."""
    variants = {
        "metaadv": b.metaadv,
        "metaadv_batched": b.metaadv_batched,
        "higher": b.higher_loop,
        "plain_loop": b.plain_loop,
        "pgd_at": b.pgd_at,
        "floor": b.floor,
        "metaadv_bf16_attacks": b.meta_step(autocast_attacks=True),
        f"metaadv_reuse{REUSE}": b.metaadv_reuse,
    }
    if compile_variants:  # the first (warm-up) call compiles
        variants["metaadv_compiled_attacks"] = b.meta_step(compile_attacks="compile")
        variants["metaadv_batched_compiled_attacks"] = b.meta_step(batched=True, compile_attacks="compile")
        if device.type == "cuda":
            variants["metaadv_batched_cudagraph_attacks"] = b.meta_step(batched=True, compile_attacks="cudagraphs")
    med = time_side_by_side(variants, repeats, device)  # fmt: skip
    med[f"metaadv_reuse{REUSE}"] /= REUSE  # per meta-step, amortized over one crafting step and REUSE - 1 reusing ones
    print(f"## Meta-step vs peers ({b.tasks} tasks x {b.shots}+{b.shots}, {b.spec}, 1 second-order inner step, "
          f"{device}, {torch.get_num_threads()} threads, median of {repeats})\n")  # fmt: skip
    print("| variant | seconds | time / looped metaadv | time / floor |\n|---|---:|---:|---:|")
    for k in (k for k in med if k != "floor"):
        print(f"| {k} | {med[k]:.3f} | {med[k] / med['metaadv']:.2f} | {med[k] / med['floor']:.2f} |")
    print(f"| floor (passes alone) | {med['floor']:.3f} | | 1.00 |")
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/speed_<device>[_<only>].json)")
    p.add_argument("--ops", action="store_true", help="also count kernel launches and host syncs per step (on CPU)")
    p.add_argument("--compile", action="store_true", help="also compiled attacks (compile_attacks; cudagraphs on CUDA)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections (implies their flags)")
    args = p.parse_args()
    device = resolve_device(args.device)
    quick = args.quick
    shots, steps, repeats = (8, 2, 2) if quick else (32, 5, 5)
    tasks_main = 2 if quick else 8
    sections = set(args.only or ("peers", "pgd", "scaling", *(["compile"] * args.compile), *(["ops"] * args.ops)))
    compiling = args.compile or "compile" in sections
    if compiling and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold compilation times: fresh caches
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="speed_inductor_")
    result: dict = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "shots": shots, "attack_steps": steps, "quick": quick, "sections": sorted(sections)}  # fmt: skip
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    only = "".join(f"_{k}" for k in args.only or ())  # a partial run never overwrites the full run's JSON
    out = Path(args.out or f"benchmarks/results/speed_{device.type}{'_quick' if quick else ''}{only}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    if "peers" in sections:
        result["peers"] = {"tasks": tasks_main, **peers(Bench(device, tasks_main, shots, steps, 1), device, repeats,
                                                         compiling)}  # fmt: skip
        save()
    if "pgd" in sections:
        thr = result["pgd"] = pgd_throughput(device, 64 if quick else 512, 5 if quick else 10, repeats)
        native, theirs = thr["native_img_per_s"], thr["torchattacks_img_per_s"]
        print("\n## PGD throughput (images/s, same eps/alpha/steps)\n\n| native | torchattacks | ratio |")
        print(f"|---:|---:|---:|\n| {native:.0f} | {theirs:.0f} | {native / theirs:.2f} |")
        save()
    if "scaling" in sections:
        print("\n## Scaling (metaadv meta-step; graph and peak memory of the looped step)\n")
        print("| tasks | inner steps | looped (s) | batched (s) | autograd graph (MiB) | CUDA peak (MiB) |")
        print("|---:|---:|---:|---:|---:|---:|")
        r = max(2, repeats // 2)
        result["scaling_tasks"] = [
            scaling_row(device, t, shots, steps, 1, r) for t in ((1, 2, 4) if quick else (1, 2, 4, 8, 16))
        ]
        result["scaling_inner"] = [
            scaling_row(device, 4, shots, steps, k, r) for k in ((1, 2) if quick else (1, 2, 3, 5))
        ]
        save()
        figure = out.with_name(f"{out.stem}_scaling.png")  # next to the JSON
        plot_scaling(result, figure)
        print(f"\nwrote {figure}")
    if "compile" in sections:
        result["compile"] = compile_table(device, quick, repeats)
        save()
    if "ops" in sections:
        result["ops"] = ops_table(quick, shots, steps)
        save()
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
