"""Speed of a meta-step against its peers and its floor, measured side by side in one run.

    python benchmarks/speed.py            # full: ~5 minutes on 2 CPU cores
    python benchmarks/speed.py --quick    # a smoke run in well under a minute
    python benchmarks/speed.py --ops      # also the kernel launches and host syncs per step (+ ~15 minutes on CPU)

Prints markdown tables and writes benchmarks/results/speed_<device>.json and a scaling plot beside it:
- metaadv's meta-step (looped over tasks, the default) vs its task-batched execution
  (`MetaConfig(batched=True)`: one attack call for all tasks, vmap over the inner loop and query loss) vs
  the same algorithm written with `higher` (innerloop_ctx) and as a plain loop of torch.autograd calls over
  `functional_call`; every variant crafts the same attacks (native PGD against the meta-parameters) and
  takes one Adam step; ratios to the looped metaadv step and to the floor. Two options are timed beside
  them: the attacks under bf16 autocast (`autocast_attacks`) and adversarial-example reuse
  (`reuse_every=4`, per meta-step averaged over one crafting and three reusing steps).
- native PGD vs torchattacks PGD, images per second at equal steps.
- efficiency vs the floor: the meta-step divided by the forward/backward passes it must do
  (attack steps + inner steps + query pass) timed alone.
- scaling: meta-step time (looped and batched) vs tasks (1..16) and vs inner steps (1..5), with the memory
  the autograd graph of the looped step holds for the meta-backward (and the CUDA peak on a GPU).
- with ``--ops``: the kernel launches and host syncs of one step (pgd_at, meta looped, meta batched; 1..32
  tasks), counted on CPU whatever ``--device`` is (``benchmarks/op_count.py``), in the JSON under ``ops``.
Timings are medians over interleaved repeats (variants alternate), after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import higher
import op_count  # benchmarks/op_count.py: launches and host syncs of a step, counted on CPU
import torch
import torch.nn.functional as F
import torchattacks

import metaadv as ma
from metaadv.engine import resolve_device
from metaadv.functional import call, clone_buffers, model_fn, state
from metaadv.meta import meta_batch_loss
from metaadv.meta.options.reuse import AdversarialPool
from metaadv.models import SmallCNN
from metaadv.tasks import split_support_query

EPS, INNER_LR = 0.3, 0.01
REUSE = 4  # reuse_every of the reuse variant


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
                                 inner_steps=inner, inner_lr=INNER_LR)  # fmt: skip
        self.cfg_batched = dataclasses.replace(self.cfg, batched=True)
        self.cfg_bf16 = dataclasses.replace(self.cfg, autocast_attacks=True)

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def metaadv(self) -> None:
        self.update(meta_batch_loss(self.model, self.params, self.buffers, self.dist.sample(self.tasks),
                                    self.x, self.y, self.cfg).loss)  # fmt: skip

    def metaadv_batched(self) -> None:
        self.update(meta_batch_loss(self.model, self.params, self.buffers, self.dist.sample(self.tasks),
                                    self.x, self.y, self.cfg_batched).loss)  # fmt: skip

    def metaadv_bf16_attacks(self) -> None:
        self.update(meta_batch_loss(self.model, self.params, self.buffers, self.dist.sample(self.tasks),
                                    self.x, self.y, self.cfg_bf16).loss)  # fmt: skip

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/speed_<device>.json)")
    p.add_argument("--ops", action="store_true", help="also count kernel launches and host syncs per step (on CPU)")
    args = p.parse_args()
    device = resolve_device(args.device)
    quick = args.quick
    shots, steps, repeats = (8, 2, 2) if quick else (32, 5, 5)
    tasks_main = 2 if quick else 8
    result: dict = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "shots": shots, "attack_steps": steps, "quick": quick}  # fmt: skip

    b = Bench(device, tasks_main, shots, steps, inner=1)
    variants = {"metaadv": b.metaadv, "metaadv_batched": b.metaadv_batched, "higher": b.higher_loop,
                "plain_loop": b.plain_loop, "floor": b.floor, "metaadv_bf16_attacks": b.metaadv_bf16_attacks,
                f"metaadv_reuse{REUSE}": b.metaadv_reuse}  # fmt: skip
    med = time_side_by_side(variants, repeats, device)
    med[f"metaadv_reuse{REUSE}"] /= REUSE  # per meta-step, amortized over one crafting step and REUSE - 1 reusing ones
    result["peers"] = {"tasks": tasks_main, **med}
    print(f"## Meta-step vs peers ({tasks_main} tasks x {shots}+{shots}, PGD-{steps}, 1 second-order inner step, "
          f"{device}, {torch.get_num_threads()} threads, median of {repeats})\n")  # fmt: skip
    print("| variant | seconds | time / looped metaadv | time / floor |\n|---|---:|---:|---:|")
    for k in ("metaadv", "metaadv_batched", "metaadv_bf16_attacks", f"metaadv_reuse{REUSE}", "higher", "plain_loop"):
        print(f"| {k} | {med[k]:.3f} | {med[k] / med['metaadv']:.2f} | {med[k] / med['floor']:.2f} |")
    print(f"| floor (passes alone) | {med['floor']:.3f} | | 1.00 |")

    thr = pgd_throughput(device, 64 if quick else 512, 5 if quick else 10, repeats)
    result["pgd"] = thr
    print("\n## PGD throughput (images/s, same eps/alpha/steps)\n")
    native, theirs = thr["native_img_per_s"], thr["torchattacks_img_per_s"]
    print(
        f"| native | torchattacks | ratio |\n|---:|---:|---:|\n| {native:.0f} | {theirs:.0f} | {native / theirs:.2f} |"
    )

    print("\n## Scaling (metaadv meta-step; graph and peak memory of the looped step)\n")
    print("| tasks | inner steps | looped (s) | batched (s) | autograd graph (MiB) | CUDA peak (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    r = max(2, repeats // 2)
    result["scaling_tasks"] = [
        scaling_row(device, t, shots, steps, 1, r) for t in ((1, 2, 4) if quick else (1, 2, 4, 8, 16))
    ]
    result["scaling_inner"] = [scaling_row(device, 4, shots, steps, k, r) for k in ((1, 2) if quick else (1, 2, 3, 5))]

    if args.ops:
        result["ops"] = ops_table(quick, shots, steps)

    out = Path(args.out or f"benchmarks/results/speed_{device.type}{'_quick' if quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    figure = out.with_name(f"{out.stem}_scaling.png")  # next to the JSON
    plot_scaling(result, figure)
    print(f"\nwrote {out} and {figure}")


if __name__ == "__main__":
    main()
