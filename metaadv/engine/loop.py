"""The one training loop: ``fit`` runs a method's step over shuffled batches, applies each update only if it is
finite (rolling back everything the step changed otherwise), logs, checkpoints and stops on signals.

Under ``torchrun`` (see ``distributed.py`` and docs/scaling.md) every rank runs the loop: gradients and the
loss are summed over ranks before the finiteness check (so every rank takes the same decision), BatchNorm
statistics are averaged after an applied step, and only rank 0 logs, shows progress and writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from .. import distributed
from ..config import LoopConfig
from .resume import Checkpointing, Progress, resume_into, save
from .signals import StopOnSignal
from .state import Stateful
from .update import Window

__all__ = [
    "NonFiniteLossError",
    "RunLogger",
    "StepFn",
    "StepOutput",
    "TrainResult",
    "Trainable",
    "TrainingInterrupted",
    "fit",
]

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step of a method hands the engine.

    ``objective`` is back-propagated; ``loss`` (default: the objective) is logged. ``logged`` tensors (scalars
    or 1-d) are read from the device together with the loss and the gradient norm, in one host sync, and land
    in the step's record as floats or lists of floats; ``record`` holds host-side values for it.
    """

    objective: Tensor  # scalar with its graph to the trained tensors
    logged: dict[str, Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    loss: Tensor | None = None


StepFn = Callable[[Tensor, Tensor, int], StepOutput]  # (x batch, y batch, 0-based step index) -> StepOutput


@dataclass
class Trainable:
    """What the engine trains: the module, its optimizer and the state the method owns.

    ``params``: every tensor the optimizer steps (the gradient norm is over them). ``state``: named objects
    saved in every checkpoint besides the model (``"optimizer"`` is added). ``volatile``: those a step changes
    outside the optimizer; their state is put back, with the model's buffers, when a step is skipped.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: Sequence[Tensor]
    state: Mapping[str, Stateful] = field(default_factory=dict)
    volatile: Mapping[str, Stateful] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a training run returns: the trained model (eval mode), one record per step and what the method
    learned besides the model (``artifacts``, name -> object; e.g. Meta-SGD's ``"inner_lr"``), which are also
    read as attributes (``result.inner_lr``)."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)  # per step: step, epoch, seconds, loss, ...
    seconds: float = 0.0  # wall-clock of the whole run (all resumed segments together)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        artifacts = self.__dict__.get("artifacts", {})
        if name in artifacts:
            return artifacts[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or artifact {name!r} (artifacts: "
                             f"{sorted(artifacts)})")  # fmt: skip


class RunLogger(Protocol):
    """Where a run's logged steps go besides the text log (e.g. ``engine.tensorboard.TensorBoardLogger``); the
    engine calls it on rank 0 only."""

    def start(self, config: Mapping[str, Any], first_step: int) -> None:
        """Before the first step: the run's identity (JSON types) and the steps already done (a resume's)."""

    def step(self, record: Mapping[str, Any], lrs: Sequence[float]) -> None:
        """Every ``loop.log_every`` steps and the last: the step's record (as in the history) and the learning
        rate of each optimizer parameter group."""

    def flush(self) -> None:
        """After every checkpoint: what was logged so far reaches the disk."""

    def close(self) -> None:
        """When the run returns or raises."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary (after saving a checkpoint, if a directory was set)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, history: list[dict[str, Any]]) -> None:
        self.signum, self.step, self.checkpoint, self.history = signum, step, checkpoint, history
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint directory, nothing saved"
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; {saved}")


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient; training stopped."""

    def __init__(self, message: str, history: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.history = history


def fit(
    trainable: Trainable,
    x: Tensor,
    y: Tensor,
    step: StepFn,
    loop: LoopConfig,
    *,
    checkpointing: Checkpointing | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    logger: RunLogger | None = None,
) -> TrainResult:
    """Run ``step`` over shuffled batches of ``(x, y)`` for ``loop.steps`` (or ``loop.epochs`` full passes).

    Each batch holds ``loop.batch_size`` examples; the last incomplete batch of an epoch is dropped. The data
    order comes from a generator seeded with ``loop.seed``; the model is in training mode during the run and
    in eval mode afterwards (also when the run raises).

    Each step's objective is back-propagated and the optimizer steps only if the loss and the gradient norm
    are finite; otherwise the gradients are dropped and the model's buffers and ``trainable.volatile`` are put
    back, so a bad step changes nothing. Bad steps are counted (``bad_steps`` in every record) and logged;
    after ``loop.max_bad_steps`` consecutive ones ``NonFiniteLossError`` is raised.

    Checkpoints (``checkpointing``, see ``Checkpointing``) hold the model, ``trainable.state``, the optimizer,
    the data order, the global RNG states (torch, CUDA, numpy, random), the history and ``config``; a resume
    restores them all, so the run continues bit for bit as if never stopped (same machine and thread count),
    and is refused with ``CheckpointError`` naming the differences if ``config`` differs. SIGTERM/SIGINT save
    a checkpoint and raise ``TrainingInterrupted``.

    ``logger`` (rank 0 only) gets the run's ``config`` (and ``loop``: batch size, seed, examples, steps) at the
    start, every logged step's record with the learning rates, a flush after every checkpoint and a close at the
    end; it reads only what the record holds, so it adds no host sync and changes nothing the run computes.
    """
    checkpointing = checkpointing or Checkpointing()
    per_epoch = len(x) // loop.batch_size
    if per_epoch == 0:
        raise ValueError(f"one step needs {loop.batch_size} examples but the training set has only {len(x)}")
    directory = checkpointing.directory
    if directory is not None and checkpointing.resume is False and (existing := ckpt.list_checkpoints(directory)):
        raise ckpt.CheckpointError(
            f"{directory} already holds checkpoints of a run (newest: {existing[-1].name}); pass resume=True "
            "to continue it, or use an empty directory (nothing was overwritten)"
        )
    total = loop.steps if loop.steps is not None else loop.epochs * per_epoch
    state = {"model": trainable.model, **trainable.state, "optimizer": trainable.optimizer}
    identity = {"batch_size": loop.batch_size, "seed": loop.seed, "n_examples": len(x)}
    config_json = json.loads(json.dumps(dict(config or {})))  # normalized (tuples -> lists) for comparison
    run = Progress(torch.Generator().manual_seed(loop.seed), identity, config_json)
    rng = resume_into(checkpointing, run, state, desc, total) if checkpointing.resume is not False else None
    if directory is not None and distributed.is_main():
        ckpt.remove_stale_temporaries(directory)
    if run.order is None:
        run.order = torch.randperm(len(x), generator=run.generator)
    if rng is not None:
        ckpt.restore_rng(rng["state"])  # last: nothing after this point may draw random numbers before the loop
        if rng["reseed"]:  # a checkpoint of another world size: fresh, still distinct, attack streams per rank
            torch.manual_seed(int(torch.randint(2**62, ())) + distributed.rank())
    logger = logger if distributed.is_main() else None
    trainable.model.train()
    try:
        if logger is not None:
            logger.start({**config_json, "loop": {**identity, "steps": total}}, run.done)
        _loop(trainable, x, y, step, loop, run, total, per_epoch, checkpointing, state, progress, desc, logger)
    finally:
        trainable.model.eval()
        if logger is not None:
            logger.close()
    return TrainResult(model=trainable.model, history=run.history, seconds=run.elapsed_before)


def _loop(trainable: Trainable, x: Tensor, y: Tensor, step: StepFn, loop: LoopConfig, run: Progress, total: int,
          per_epoch: int, checkpointing: Checkpointing, state: Mapping[str, Any], progress: bool,
          desc: str, logger: RunLogger | None) -> None:  # fmt: skip
    """Steps ``run.done`` .. ``total - 1``; on return ``run.elapsed_before`` holds the run's whole wall-clock."""
    main, start, first = distributed.is_main(), time.perf_counter(), run.elapsed_before
    env = ckpt.environment() if checkpointing.directory is not None else {}

    def elapsed() -> float:
        return first + time.perf_counter() - start

    bar = tqdm(total=total, initial=min(run.done, total), desc=desc, disable=not (progress and main) or None,
               leave=False)  # fmt: skip
    stopper, last_saved = StopOnSignal(), (run.done, None)  # (step, file) of the newest checkpoint written here
    window = Window(trainable, step, state, elapsed)
    try:
        with stopper.installed(checkpointing.directory is not None):
            order = run.order.to(x.device)  # the epoch's order on the device: one copy per epoch, not per step
            for i in range(run.done, total):
                pos = i % per_epoch
                if pos == 0 and i > 0:
                    run.order = torch.randperm(len(x), generator=run.generator)
                    order = run.order.to(x.device)
                window.run(x, y, order[pos * loop.batch_size : (pos + 1) * loop.batch_size], i)
                signum = distributed.max_over_ranks(stopper.signum or 0)  # ranks stop together, at the same step
                saving = checkpointing.directory is not None and ((i + 1) % checkpointing.every == 0 or i + 1 == total)
                if not (signum or saving or _logged(i, loop, total)):
                    continue  # no host read inside a window: its steps are checked together at its end
                for j, seconds, record in window.settle(x, y):
                    record = _account(run, record, j, j // per_epoch, seconds, loop, total, desc)
                    if logger is not None and _logged(j, loop, total):
                        logger.step(record, [float(g["lr"]) for g in trainable.optimizer.param_groups])
                    bar.update(1)
                bar.set_postfix(loss=f"{run.history[-1]['loss']:.3f}")
                if saving:
                    last_saved = (i + 1, save(checkpointing, run, state, elapsed(), env, i + 1))
                    if logger is not None:
                        logger.flush()
                if signum:
                    path = None
                    if checkpointing.directory is not None:
                        path = last_saved[1] if last_saved[0] == i + 1 else save(checkpointing, run, state,
                                                                                 elapsed(), env, i + 1)  # fmt: skip
                    raise TrainingInterrupted(signum, i + 1, path, run.history)
                if i + 1 < total:
                    window = Window(trainable, step, state, elapsed)
    finally:
        bar.close()
        run.elapsed_before = elapsed()


def _account(run: Progress, record: dict[str, Any], i: int, epoch: int, seconds: float, loop: LoopConfig,
             total: int, desc: str) -> dict[str, Any]:  # fmt: skip
    """Count, log and record step ``i`` (returns its record as the history holds it); raise
    ``NonFiniteLossError`` after too many bad steps in a row."""
    bad = bool(record.get("skipped", False)) or not math.isfinite(record["loss"])
    run.bad_streak = run.bad_streak + 1 if bad else 0
    run.bad_total += bad
    record = {"step": i + 1, "epoch": epoch, **record, "bad_steps": run.bad_total, "seconds": seconds}
    run.add(record)
    main = distributed.is_main()
    if bad and main:
        log.warning(
            "%s step %d: non-finite loss or gradient (loss %s)%s; %d in a row, %d in total",
            desc, i + 1, record["loss"], ", update skipped" if record.get("skipped") else "", run.bad_streak,
            run.bad_total,
        )  # fmt: skip
    if bad and loop.max_bad_steps is not None and run.bad_streak >= loop.max_bad_steps:
        raise NonFiniteLossError(
            f"{desc} stopped at step {i + 1}: {run.bad_streak} consecutive steps had a non-finite loss "
            f"or gradient (max_bad_steps={loop.max_bad_steps}). Their updates were skipped, so the model "
            f"holds the parameters after step {i + 1 - run.bad_streak}. Usual causes: a learning rate "
            "too high (outer_lr, inner_lr), an attack producing NaN, or a model whose logits overflow.",
            run.history,
        )
    if main and _logged(i, loop, total):
        log.info("%s step %d/%d loss %.4f (%.1fs)", desc, i + 1, total, record["loss"], seconds)
    return record


def _logged(i: int, loop: LoopConfig, total: int) -> bool:
    """Whether step ``i`` (0-based) is logged: every ``loop.log_every`` steps and the last."""
    return (i + 1) % loop.log_every == 0 or i + 1 == total
