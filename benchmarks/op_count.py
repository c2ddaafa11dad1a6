"""Kernel launches and host syncs of one training step, counted exactly on CPU.

    .venv/bin/python benchmarks/op_count.py                     # pgd_at, meta (looped), meta_batched at 1..32 tasks
    .venv/bin/python benchmarks/op_count.py --tasks 8 --top 15  # one task count, with the operators by name
    .venv/bin/python benchmarks/speed.py --ops                  # the same table in speed.py's output and JSON

A small model's step on a GPU is launch-bound: its time follows the kernels it launches and the times the host
waits for the device, not its FLOPs. Both are fixed by the code, not by the hardware, so ``OpCounter`` (a
``TorchDispatchMode``) counts them on CPU from the ATen operators a step dispatches, after autograd and the
composite decompositions, in the forward passes, the autograd engine's backward passes and the optimizer step.

- **ops** (kernel launches): every dispatched operator except those that launch no kernel: views (an operator
  that mutates nothing and returns a tensor aliasing an input, by its schema: ``view``, ``t``, ``transpose``,
  ``expand``, ``slice``, ``select``, ``(un)squeeze``, ``permute``, ``as_strided``, ``alias``, ``detach``,
  ``split``, ``unbind``, ``lift_fresh``, ...), in-place views (``torch.Tag.inplace_view``: ``t_``, ``detach_``,
  ``resize_``, ``set_``, ...), ``_unsafe_view`` (a view its schema does not mark), bare allocations
  (``empty*``, ``new_empty*``: the caching allocator, no kernel), profiler markers and scalar reads; plus one
  ``h2d copy`` per copy of host data to the device (below).
- **syncs** (the host waits for the device): ``_local_scalar_dense`` (``.item()``, ``float()``, ``int()``,
  ``bool()`` of a tensor), ``.tolist()``, ``.cpu()`` and ``.to("cpu")`` (no dispatch on CPU: counted by
  wrapping the methods), the operators whose output shape depends on the data (``nonzero``, ``masked_select``,
  ``unique*``, ``equal``, indexing with a boolean mask; also launches), and blocking host-to-device copies
  (``torch.tensor`` / ``torch.as_tensor`` of Python numbers given a device, ``.to(device)`` of a host tensor:
  CUDA's pageable copy synchronizes the stream).
- **host** work is neither: a GPU run keeps some tensors on the host, so operators on them launch nothing and
  reading them waits for nothing. A tensor is a host tensor if it is built without a device (``torch.zeros``,
  ``torch.tensor``, ... with no ``device=``: PyTorch's default device), drawn with a CPU ``torch.Generator``, is
  an optimizer's ``step`` counter (kept on the CPU unless ``capturable`` or ``fused``), or is computed from host
  tensors only. ``Counts.host_ops`` / ``host_reads`` list them (the task sampler, Adam's step counters).

What a CPU run cannot tell: a ``torch.device`` argument is taken as the run's device (on CPU ``x.device`` and the
host are the same); ``.to(device)`` of a host tensor makes that very tensor a device one (on CPU they are one
object). One operator is one launch, though on CUDA a ``_foreach_*`` operator launches one kernel per ~36-110
tensors and a few operators launch two. And the CPU build runs Adam per tensor (about 7 launches per parameter)
where the CUDA build runs its ``_foreach`` form (7 in all): ``ops_cuda_adam`` puts the latter in place of the
former (``adam_step_counts``), which is the better prediction of a GPU step's launches.

One step of a method is counted through the public API as its 2-step run minus its 1-step run (``metaadv.train``
on the same model, data and seed): the second step's batch indexing, forward, backward, gradient norm, host read
and optimizer step, without the set-up or the optimizer's state initialization. The counts do not depend on the
tensor sizes (the model's width, the batch), only on the code path.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.optim.optimizer as optim_hooks
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

import metaadv as ma
from metaadv.models import SmallCNN

__all__ = ["ATTACK", "VARIANTS", "WINDOW", "Counts", "OpCounter", "Workload", "adam_step_counts", "breakdown",
           "markdown", "op_table", "step_counts", "window_counts"]  # fmt: skip

aten = torch.ops.aten
ATTACK = "pgd_linf(eps=0.3, steps=5)"
VARIANTS = ("pgd_at", "meta", "meta_batched")  # pgd_at; meta_train looped over tasks (batched=False); batched
WINDOW = ma.LoopConfig().log_every  # steps per host read of the engine (the default logging window)
_NO_KERNEL = {aten._unsafe_view, aten.empty, aten.empty_like, aten.empty_strided, aten.empty_permuted,
              aten.new_empty, aten.new_empty_strided, aten.is_same_size}  # fmt: skip
_SHAPE_SYNCS = {aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique, aten._unique2,
                aten.unique_dim, aten.equal}  # fmt: skip
_MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# constructors whose tensor stays on the host unless given a device (with torch.tensor and torch.as_tensor)
_FACTORIES = ("zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "randperm", "linspace", "eye",
              "scalar_tensor")  # fmt: skip
_TORCH_DIR = str(Path(torch.__file__).parent)
_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def launches_no_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` is a view, an in-place view, ``_unsafe_view`` or a bare allocation (see the module doc)."""
    schema = func._schema
    view = not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)
    marker = func.namespace == "profiler"  # record_function's enter/exit
    return view or marker or torch.Tag.inplace_view in func.tags or func.overloadpacket in _NO_KERNEL


def _masked(args: Sequence[Any]) -> bool:
    """Whether an indexing operator's indices (its second argument) hold a boolean mask."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


@dataclass
class Counts:
    """What a counted region did. ``ops``: launches by operator (``aten.add``; ``h2d copy``: a host tensor or
    Python number copied to the device); ``phases``: launches by phase (``forward``; ``autograd``: run by the
    autograd engine; ``optimizer``: inside ``Optimizer.step``); ``syncs``: host syncs by call site and kind
    (``metaadv/engine/update.py:94 tolist``); ``host_ops`` / ``host_reads``: operators on, and reads of, tensors
    that a GPU run keeps on the host (no launch, no sync); ``no_kernel``: views and allocations, by operator;
    ``files``: launches by the file that issued them (for the autograd engine's: the one that called ``backward``
    or ``autograd.grad``)."""

    ops: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)
    host_ops: Counter[str] = field(default_factory=Counter)
    host_reads: Counter[str] = field(default_factory=Counter)
    no_kernel: Counter[str] = field(default_factory=Counter)
    files: Counter[str] = field(default_factory=Counter)

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    def __sub__(self, other: Counts) -> Counts:
        """Per-key difference (zeros dropped): a longer run minus a shorter one."""

        def minus(a: Counter[str], b: Counter[str]) -> Counter[str]:
            return Counter({k: a[k] - b[k] for k in a.keys() | b.keys() if a[k] != b[k]})

        return Counts(*(minus(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)))


def _caller() -> tuple[str, int]:
    """(path, line) of the innermost caller outside torch and this file; the path relative to the repository."""
    frame = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return "?", 0
    path = Path(frame.f_code.co_filename)
    return str(path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path.name), frame.f_lineno


def _site(kind: str) -> str:
    """``path:line kind`` of the code that asked for a sync (or a host read)."""
    path, line = _caller()
    return f"{path}:{line} {kind}"


def _is_cpu(device: Any) -> bool:
    """Whether ``device`` spells out the host (``"cpu"``); a ``torch.device`` is taken as the run's device, which
    a CPU run cannot tell apart from the host (``x.device``)."""
    return isinstance(device, str) and device.startswith("cpu")


def _device_target(args: tuple, kwargs: dict) -> Any:
    """The device a ``Tensor.to`` call names (a device, a string or a tensor's), or None (dtype only)."""
    for a in (*args, kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, (torch.device, str)):
            return a
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class OpCounter(TorchDispatchMode):
    """Count the kernel launches and host syncs of the code run inside ``with OpCounter() as c:`` into
    ``c.counts`` (see the module doc for the rule). Backward passes and optimizer steps run inside are counted
    too. Not re-entrant; while active it wraps ``Tensor.tolist`` / ``.cpu`` / ``.to``, ``torch.tensor`` /
    ``torch.as_tensor`` and the factories of ``_FACTORIES`` (``torch.zeros``, ...), and installs global
    optimizer-step hooks; all are put back on exit."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()
        self._host = WeakIdKeyDictionary()  # tensors a GPU run keeps on the host -> True
        self._in_optimizer = 0
        self._building = 0  # > 0: inside a constructor that builds a host tensor
        self._undo: list[Callable[[], None]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet, c = func.overloadpacket, self.counts
        name, inputs, generator = str(packet), _tensors((args, kwargs)), kwargs.get("generator")
        host = self._building or (inputs and all(self.on_host(t) for t in inputs))
        if host or (generator is not None and generator.device.type == "cpu"):
            self._mark_host(out)
            if packet is aten._local_scalar_dense:
                c.host_reads[_site("item")] += 1
            elif not launches_no_kernel(func):
                c.host_ops[name] += 1
        elif packet is aten._local_scalar_dense:
            c.syncs[_site("item")] += 1
        elif launches_no_kernel(func):
            c.no_kernel[name] += 1
        else:
            self._launch(name)
            if packet in _SHAPE_SYNCS or (packet in _MASK_INDEXING and _masked(args)):
                c.syncs[_site(name.removeprefix("aten."))] += 1
        return out

    def on_host(self, t: torch.Tensor) -> bool:
        """Whether a GPU run would keep ``t`` on the host (built without a device, drawn from a CPU generator, an
        optimizer's step counter, or computed from such tensors only)."""
        return t in self._host

    def _mark_host(self, out: Any) -> None:
        for t in _tensors(out):
            self._host[t] = True

    def _launch(self, name: str) -> None:
        self.counts.ops[name] += 1
        self.counts.files[_caller()[0]] += 1
        phase = "optimizer" if self._in_optimizer else "forward"
        if not self._in_optimizer and torch._C._current_autograd_node() is not None:
            phase = "autograd"
        self.counts.phases[phase] += 1

    def _read(self, t: torch.Tensor, kind: str) -> None:
        """A device-to-host read of ``t`` (a sync), or a read of a host tensor (none)."""
        (self.counts.host_reads if self.on_host(t) else self.counts.syncs)[_site(kind)] += 1

    def _copy_to_device(self, blocking: bool) -> None:
        """A host-to-device copy: one launch, and a sync when blocking (``non_blocking=False``)."""
        self._launch("h2d copy")
        if blocking:
            self.counts.syncs[_site("h2d copy")] += 1

    def __enter__(self) -> OpCounter:
        self._patch(torch.Tensor, "tolist", self._tolist)
        self._patch(torch.Tensor, "cpu", self._cpu)
        self._patch(torch.Tensor, "to", self._to)
        for name in ("tensor", "as_tensor"):
            self._patch(torch, name, self._from_data)
        for name in _FACTORIES:
            self._patch(torch, name, self._factory)
        pre = optim_hooks.register_optimizer_step_pre_hook(lambda opt, *_: self._optimizer(1, opt))
        post = optim_hooks.register_optimizer_step_post_hook(lambda opt, *_: self._optimizer(-1, opt))
        self._undo += [pre.remove, post.remove]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            while self._undo:
                self._undo.pop()()

    def _optimizer(self, delta: int, optimizer: torch.optim.Optimizer) -> None:
        """Enter (+1) or leave (-1) ``optimizer.step``; its ``step`` counters are host tensors unless the group is
        ``capturable`` or ``fused`` (PyTorch keeps them on the CPU then)."""
        self._in_optimizer += delta
        for group in optimizer.param_groups:
            if not (group.get("capturable") or group.get("fused")):
                for p in group["params"]:
                    step = optimizer.state.get(p, {}).get("step")
                    if isinstance(step, torch.Tensor):
                        self._host[step] = True

    def _patch(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def patched(*args: Any, **kwargs: Any) -> Any:
            return wrapper(original, *args, **kwargs)

        setattr(owner, name, patched)
        self._undo.append(lambda: setattr(owner, name, original))

    def _tolist(self, original: Callable[..., Any], t: torch.Tensor) -> Any:
        self._read(t, "tolist")
        return original(t)

    def _cpu(self, original: Callable[..., Any], t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._read(t, "cpu")
        out = original(t, *args, **kwargs)
        if out is not t:  # on CPU it is t, which stays where it was
            self._mark_host(out)
        return out

    def _to(self, original: Callable[..., Any], t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``.to(device)`` of a host tensor copies it to the device; ``.to("cpu")`` of a device tensor reads it."""
        target, host = _device_target(args, kwargs), self.on_host(t)
        if host and target is not None and not _is_cpu(target):
            self._copy_to_device(blocking=not kwargs.get("non_blocking", False))
        elif not host and _is_cpu(target):
            self._read(t, "to cpu")
        out = original(t, *args, **kwargs)
        if target is not None and _is_cpu(target) and out is not t:
            self._mark_host(out)
        elif target is not None and not _is_cpu(target):
            self._host.pop(out, None)
        return out

    def _factory(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``torch.zeros`` and the like: a host tensor unless a device is given (PyTorch's default device)."""
        device = kwargs.get("device")
        if device is not None and not _is_cpu(device):
            out = original(*args, **kwargs)
            self._host.pop(out, None)
            return out
        self._building += 1  # its own operators run on the host
        try:
            out = original(*args, **kwargs)
        finally:
            self._building -= 1
        self._mark_host(out)
        return out

    def _from_data(self, original: Callable[..., Any], data: Any, *args: Any, **kwargs: Any) -> Any:
        """``torch.tensor`` / ``torch.as_tensor``: without a device (or with ``"cpu"`` spelled out) a host tensor
        if ``data`` is host data; with one, a copy to the device unless ``data`` is already a device tensor."""
        device = next((a for a in args if isinstance(a, (torch.device, str))), kwargs.get("device"))
        data_on_host = not isinstance(data, torch.Tensor) or self.on_host(data)
        if device is not None and not _is_cpu(device):
            if data_on_host:
                self._copy_to_device(blocking=True)
            out = original(data, *args, **kwargs)
            self._host.pop(out, None)
            return out
        if not data_on_host:  # a device tensor, perhaps converted: on the device
            return original(data, *args, **kwargs)
        return self._factory(original, data, *args, **kwargs)


@dataclass(frozen=True)
class Workload:
    """The examples every variant runs: SmallCNN on random 28x28 grey images, ``tasks`` x (``shots`` support +
    ``shots`` query) clean examples per step (pgd_at: one batch of as many), each crafted by ``attack``."""

    tasks: int
    shots: int = 32
    attack: str = ATTACK
    hidden: int = 1024  # SmallCNN's hidden width (the counts do not depend on it)

    @property
    def examples(self) -> int:
        return self.tasks * 2 * self.shots


def _train(variant: str, w: Workload, steps: int, data: tuple[torch.Tensor, torch.Tensor], log_every: int) -> None:
    """``steps`` steps of ``variant`` through ``metaadv.train`` on CPU (the same model, data and seed each call):
    ``pgd_at``, or ``meta`` (second order, one inner step, query crafted against theta) looped or batched; the
    engine reads the device once every ``log_every`` steps."""
    torch.manual_seed(0)
    model = SmallCNN(hidden=w.hidden)
    loop = ma.LoopConfig(steps=steps, batch_size=w.examples, device="cpu", seed=0, log_every=log_every)
    if variant == "pgd_at":
        ma.train("pgd_at", model, data, [w.attack], loop=loop, progress=False)
        return
    meta = {"tasks_per_batch": w.tasks, "support_size": w.shots, "query_size": w.shots, "sample_replace": True}
    # the batched step as a GPU runs it (vmapped; on CPU its default runs the T forward passes one by one)
    batched = {"batched": True, "vmap_tasks": True} if variant == "meta_batched" else {"batched": False}
    ma.train("meta", model, data, [w.attack], loop=loop, progress=False, **batched, **meta)


@functools.cache  # the 2-step run read once serves both the step and the window
def _counted(variant: str, w: Workload, steps: int, log_every: int) -> Counts:
    g = torch.Generator().manual_seed(0)
    n = 2 * w.examples  # two batches: no reshuffle between the steps
    data = (torch.rand(n, 1, 28, 28, generator=g), torch.randint(10, (n,), generator=g))
    with OpCounter() as counter:
        _train(variant, w, steps, data, log_every)
    return counter.counts


def step_counts(variant: str, w: Workload) -> Counts:
    """The launches and syncs of one steady-state step of ``variant`` inside a logging window: its 2-step run
    minus its 1-step run, both read from the device once, at their last step."""
    return _counted(variant, w, 2, log_every=2) - _counted(variant, w, 1, log_every=2)


def window_counts(variant: str, w: Workload) -> Counts:
    """What one logging window adds to its steps (``LoopConfig.log_every`` of them): the engine's read of their
    values and its in-memory copy of the state it rolls back to after a non-finite step. A 2-step run read
    after every step minus one read once."""
    return _counted(variant, w, 2, log_every=1) - _counted(variant, w, 2, log_every=2)


def adam_step_counts(model: torch.nn.Module, foreach: bool) -> Counts:
    """One steady-state step of ``metaadv.train``'s default optimizer (Adam, lr 1e-3) on ``model``'s parameters
    (copies, zero gradients): per tensor (``foreach=False``: what the CPU build runs) or in the ``_foreach``
    form the CUDA build picks by default."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.Adam(params, lr=1e-3, foreach=foreach)
    optimizer.step()  # creates the state
    with OpCounter() as counter:
        optimizer.step()
    return counter.counts


Table = dict[str, dict[int, dict[str, float]]]  # variant -> task count -> entry


def op_table(tasks: Sequence[int], shots: int = 32, attack: str = ATTACK, hidden: int = 1024,
             counts: dict[str, dict[int, Counts]] | None = None) -> Table:  # fmt: skip
    """variant -> task count -> ``{ops, syncs, ratio_to_pgd_at}``: launches and syncs per step of a run at the
    default logging window (a step's own, ``step_ops`` / ``step_syncs``, plus its share of the window's,
    ``window_ops`` / ``window_syncs`` over ``WINDOW`` steps) and the launches over pgd_at's on as many examples;
    with ``ops_cuda_adam`` / ``ratio_cuda_adam`` (Adam's step as the CUDA build runs it), ``optimizer_ops`` (as
    counted) and ``host_ops`` / ``host_reads``. ``counts``, if given, receives every step's ``Counts``."""
    adam_cuda = adam_step_counts(SmallCNN(hidden=hidden), foreach=True).n_ops
    table: Table = {v: {} for v in VARIANTS}
    for t in tasks:
        w = Workload(t, shots, attack, hidden)
        found = {v: step_counts(v, w) for v in VARIANTS}
        window = {v: window_counts(v, w) for v in VARIANTS}
        ops = {v: c.n_ops + window[v].n_ops / WINDOW for v, c in found.items()}
        cuda = {v: n - found[v].phases["optimizer"] + adam_cuda for v, n in ops.items()}
        for v, c in found.items():
            table[v][t] = {
                "ops": ops[v], "syncs": c.n_syncs + window[v].n_syncs / WINDOW,
                "ratio_to_pgd_at": ops[v] / ops["pgd_at"], "step_ops": c.n_ops, "step_syncs": c.n_syncs,
                "window_ops": window[v].n_ops, "window_syncs": window[v].n_syncs, "ops_cuda_adam": cuda[v],
                "ratio_cuda_adam": cuda[v] / cuda["pgd_at"],
                "optimizer_ops": c.phases["optimizer"], "host_ops": sum(c.host_ops.values()),
                "host_reads": sum(c.host_reads.values()),
            }  # fmt: skip
            if counts is not None:
                counts.setdefault(v, {})[t] = c
    return table


def markdown(table: Table, shots: int = 32) -> Iterator[str]:
    """The table as markdown lines: one row per variant and task count."""
    yield (f"| variant | tasks | examples | ops per step | syncs in a step | window of {WINDOW}: ops, syncs "
           "| ops / pgd_at | ops, CUDA Adam | / pgd_at | host ops, reads |")  # fmt: skip
    yield "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for v in VARIANTS:
        for t, e in table[v].items():
            cells = (f"{e['ops']:,.1f}", e["step_syncs"], f"{e['window_ops']}, {e['window_syncs']}",
                     f"{e['ratio_to_pgd_at']:.2f}", f"{e['ops_cuda_adam']:,.1f}", f"{e['ratio_cuda_adam']:.2f}",
                     f"{e['host_ops']}, {e['host_reads']}")  # fmt: skip
            yield f"| {v} | {t} | {t * 2 * shots:,} | " + " | ".join(map(str, cells)) + " |"


def breakdown(counts: dict[str, Counts], top: int) -> Iterator[str]:
    """Markdown lines: the ``top`` operators of the first entry by launches with every entry's count, the rest,
    the launches by phase and by the file that issued them, then each entry's syncs and host reads by call site."""
    names, first = list(counts), next(iter(counts.values()))
    listed = sorted(first.ops, key=lambda op: (-first.ops[op], op))[:top]  # ties by name
    yield "| operator | " + " | ".join(names) + " |"
    yield "|---|" + "---:|" * len(names)
    for op in listed:
        yield f"| `{op}` | " + " | ".join(f"{c.ops[op]:,}" for c in counts.values()) + " |"
    others = [c.n_ops - sum(c.ops[o] for o in listed) for c in counts.values()]
    yield "| (all others) | " + " | ".join(f"{n:,}" for n in others) + " |"
    yield "| **total** | " + " | ".join(f"**{c.n_ops:,}**" for c in counts.values()) + " |"
    for phase in ("forward", "autograd", "optimizer"):
        yield f"| of which {phase} | " + " | ".join(f"{c.phases[phase]:,}" for c in counts.values()) + " |"
    yield ""
    yield "| launched from | " + " | ".join(names) + " |"
    yield "|---|" + "---:|" * len(names)
    for path in sorted({f for c in counts.values() for f in c.files}, key=lambda f: (-first.files[f], f)):
        yield f"| `{path}` | " + " | ".join(f"{c.files[path]:,}" for c in counts.values()) + " |"
    for name, c in counts.items():
        yield ""
        yield f"{name}: {c.n_syncs} syncs: " + "; ".join(f"{k} x{n}" for k, n in sorted(c.syncs.items()))
        yield f"{name}: host reads: " + "; ".join(f"{k} x{n}" for k, n in sorted(c.host_reads.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="meta-batch sizes")
    p.add_argument("--shots", type=int, default=32, help="support = query examples per task")
    p.add_argument("--attack", default=ATTACK)
    p.add_argument("--hidden", type=int, default=1024, help="SmallCNN's hidden width")
    p.add_argument("--breakdown", type=int, default=8, help="the task count broken down by operator (0: none)")
    p.add_argument("--top", type=int, default=15, help="operators in the breakdown")
    p.add_argument("--json", type=Path, help="write the table here")
    args = p.parse_args()
    counts: dict[str, dict[int, Counts]] = {}
    table = op_table(args.tasks, args.shots, args.attack, args.hidden, counts)
    print(f"Kernel launches and host syncs per step, counted on CPU (torch {torch.__version__}), SmallCNN "
          f"(hidden {args.hidden}), {args.shots}+{args.shots} examples per task, {args.attack}\n")  # fmt: skip
    print("\n".join(markdown(table, args.shots)))
    if args.breakdown in args.tasks:
        print(f"\n### {args.breakdown} tasks by operator\n")
        order = ("meta", "meta_batched", "pgd_at")
        print("\n".join(breakdown({v: counts[v][args.breakdown] for v in order}, args.top)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"torch": torch.__version__, "shots": args.shots, "attack": args.attack, "hidden": args.hidden}
        args.json.write_text(json.dumps({**record, "ops": table}, indent=1))


if __name__ == "__main__":
    main()
