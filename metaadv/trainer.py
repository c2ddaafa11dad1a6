"""Training runs: the one epoch/step loop (data order, progress, logging, history, checkpoints) and ``meta_train``.

Methods differ only in their step function ``step(x, y) -> record``; baselines reuse ``fit``. ``fit``
owns everything a pre-empted run needs to continue exactly: periodic checkpoints (see ``checkpoint.py``),
resume, SIGTERM/SIGINT handling, and the count of steps whose loss was not finite.

Under ``torchrun`` (see ``distributed.py`` and docs/scaling.md) ``meta_train`` splits the tasks of each
meta-batch across the processes and sums their meta-gradients; ``fit`` then logs, shows progress and
writes checkpoints on rank 0 only, and every rank resumes from the checkpoint rank 0 picks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .attention import TaskAttention
from .config import MetaConfig
from .data import to_tensors
from .film import FiLM
from .functional import Params, state
from .inner import init_inner_lr
from .meta import meta_batch_loss
from .meta_dropout import MetaDropout
from .reuse import AdversarialPool
from .step_bn import StepBatchNorm
from .task_bn import TaskBatchNorm
from .tasks import AttackDistribution, PersistentGenerators
from .validation import check_labels, check_logits

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "TrainingInterrupted",
    "fit",
    "make_optimizer",
    "meta_train",
    "resolve_device",
    "update_if_finite",
]

log = logging.getLogger(__name__)
StepFn = Callable[[Tensor, Tensor], dict[str, Any]]

# MetaConfig fields a resumed run may change: they do not alter the steps already taken.
RESUMABLE_CHANGES = ("steps", "epochs", "log_every", "device", "max_bad_steps", "batched")
# MetaConfig fields newer than the first checkpoints: recorded only when not at their default, so those resume.
LATER_FIELDS = (
    "inner_params",
    "proximal",
    "first_order_until",
    "learn_inner_lr",
    "reuse_every",
    "autocast_attacks",
    "task_attention",
    "attention_entropy",
    "attention_lr",
    "task_bn",
    "task_encoding",
    "encoding_dim",
    "meta_dropout",
    "per_step_bn",
    "persistent_generator",
)


@dataclass
class TrainResult:
    """What a training run returns: the trained model (eval mode) and one record per step."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)  # per step: step, epoch, seconds, loss, ...
    seconds: float = 0.0  # wall-clock of the whole run (all resumed segments together)
    inner_lr: Params | None = None  # meta_train with learn_inner_lr: Meta-SGD's step sizes, name -> like the param
    attention: nn.Module | None = None  # meta_train with task_attention: the trained ``attention.TaskAttention``
    task_bn: TaskBatchNorm | None = None  # meta_train with task_bn: the per-attack-type BatchNorm statistics
    step_bn: StepBatchNorm | None = None  # meta_train with per_step_bn: statistics sets 1..K (set 0: the model's)
    generators: PersistentGenerators | None = None  # meta_train with persistent_generator: the trained generators


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary (after saving a checkpoint, if a directory was set)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, history: list[dict[str, Any]]) -> None:
        self.signum, self.step, self.checkpoint, self.history = signum, step, checkpoint, history
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint directory, nothing saved"
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; {saved}")


class _Tensors:
    """Named tensors in ``fit``'s ``state`` protocol: saved in checkpoints, restored in place."""

    def __init__(self, tensors: Params) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def load_state_dict(self, saved: Mapping[str, Tensor]) -> None:
        if set(saved) != set(self.tensors):
            raise KeyError(f"saved tensors {sorted(saved)}, this run has {sorted(self.tensors)}")
        with torch.no_grad():
            for k, v in self.tensors.items():
                v.copy_(saved[k])  # RuntimeError on a shape mismatch


class _StepCount:
    """The 0-based index of the next meta-step, in ``fit``'s ``state`` protocol (a resume restores it)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, saved: Mapping[str, int]) -> None:
        self.next = int(saved["next"])


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient; training stopped."""

    def __init__(self, message: str, history: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.history = history


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names as ``torch.device`` reads them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:i', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The meta-optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def training_tensors(model: nn.Module, data: Dataset | tuple[Tensor, Tensor], device: torch.device):
    """The training set as tensors on ``device``, checked against the model's output shape and classes."""
    x, y = to_tensors(data)
    x, y = x.to(device), y.to(device)
    was_training = model.training
    model.eval()  # an eval-mode probe leaves BatchNorm statistics untouched
    try:
        with torch.no_grad():
            out = model(x[:2])
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"the model failed on a batch of training images of shape {tuple(x[:2].shape)} "
            f"(dtype {x.dtype}, device {x.device}): {type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(was_training)
    logits = check_logits(out, min(2, len(x)))
    if logits.shape[1] < 2:
        raise ValueError(f"model output must be logits of shape (batch, num_classes >= 2), got {tuple(logits.shape)}")
    check_labels(y, len(x), logits.shape[1], "training labels")
    return x, y


class _StopOnSignal:
    """SIGTERM/SIGINT set a flag that the loop checks at each step boundary; a second signal stops at once.

    Handlers are installed only in the main thread (Python's rule) and the previous ones restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Iterator[_StopOnSignal]:
        if enabled and threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in self.previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            self.previous.clear()


def _check_fit_options(checkpoint_dir: Any, checkpoint_every: Any, keep_last: Any, resume: Any, max_bad: Any) -> None:
    for name, value in (("checkpoint_every", checkpoint_every), ("keep_last", keep_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_bad is not None and (isinstance(max_bad, bool) or not isinstance(max_bad, int) or max_bad < 1):
        raise ValueError(f"max_bad_steps must be None or an integer >= 1, got {max_bad!r}")
    if not isinstance(resume, (bool, str, os.PathLike)):
        raise TypeError(f"resume must be True/False or a checkpoint file path, got {type(resume).__name__}")
    if resume is True and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (the directory to resume from)")


def _config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint {saved!r}, now {current!r}"]


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    step: StepFn,
    *,
    batch_size: int,
    epochs: int,
    steps: int | None = None,
    seed: int = 0,
    log_every: int = 10,
    progress: bool = True,
    desc: str = "train",
    state: Mapping[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    keep_last: int = 3,
    resume: bool | str | Path = False,
    max_bad_steps: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Run ``step`` over shuffled batches of ``(x, y)`` for ``steps`` (or ``epochs`` full passes).

    Each batch holds ``batch_size`` examples; the last incomplete batch of an epoch is dropped. The data
    order comes from a generator seeded with ``seed``; the model is in training mode during the run
    and in eval mode afterwards.

    Checkpoints and resume:
        state: named objects with ``state_dict()``/``load_state_dict()`` saved in every checkpoint
            besides the model (optimizer, scheduler, samplers, ``checkpoint.GeneratorState(g)``, ...).
        checkpoint_dir: write a checkpoint every ``checkpoint_every`` steps, at the last step and when
            SIGTERM/SIGINT arrives (then ``TrainingInterrupted`` is raised after saving). ``None``: no
            checkpoints and default signal handling.
        keep_last: how many checkpoint files to keep.
        resume: ``True`` continues from the newest good checkpoint in ``checkpoint_dir`` (starting
            afresh if there is none); a path continues from that file. Restores model, ``state``, data
            order, global RNG states (torch, CUDA, numpy, random) and history, so the run continues
            bit for bit as if never stopped (same machine and thread count).
        config: JSON-serializable description of the run, saved in each checkpoint; a resume with a
            different one is refused with ``CheckpointError`` naming the differences.

    Non-finite steps: a step whose record has ``skipped=True`` or a non-finite ``loss`` is counted
    (``bad_steps`` in every record) and logged; after ``max_bad_steps`` consecutive ones,
    ``NonFiniteLossError`` is raised. Skipping the update is the step function's job (``meta_train`` does).
    """
    _check_fit_options(checkpoint_dir, checkpoint_every, keep_last, resume, max_bad_steps)
    per_epoch = len(x) // batch_size
    if per_epoch == 0:
        raise ValueError(f"one step needs {batch_size} examples but the training set has only {len(x)}")
    if checkpoint_dir is not None and resume is False and (existing := ckpt.list_checkpoints(checkpoint_dir)):
        raise ckpt.CheckpointError(
            f"{checkpoint_dir} already holds checkpoints of a run (newest: {existing[-1].name}); pass resume=True "
            "to continue it, or use an empty directory (nothing was overwritten)"
        )
    total = steps if steps is not None else epochs * per_epoch
    stateful = {"model": model, **(state or {})}
    config_json = json.loads(json.dumps(dict(config or {})))  # normalized (tuples -> lists) for comparison
    loop_identity = {"batch_size": batch_size, "seed": seed, "n_examples": len(x)}
    env = ckpt.environment() if checkpoint_dir is not None else {}
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    history_lines: list[str] = []  # one JSON line per record, encoded once (checkpoints hold them all)
    done, bad_streak, bad_total, elapsed_before = 0, 0, 0, 0.0
    order: Tensor | None = None
    rng_to_restore, reseed = None, False
    main, world = distributed.is_main(), distributed.world_size()

    if resume is not False:
        found = _load_for_resume(resume, checkpoint_dir) if main else None
        chosen = distributed.broadcast_object(found[0] if found is not None else None)  # rank 0 picks for all
        if found is None and chosen is not None:
            found = chosen, ckpt.load_checkpoint(chosen)
        if found is not None:
            path, payload = found
            _check_same_run(path, payload, config_json, loop_identity)
            _load_state(path, payload, stateful)
            loop = payload["loop"]
            g.set_state(loop["generator"])
            order = loop["order"]
            done, bad_streak, bad_total = payload["step"], loop["bad_streak"], loop["bad_total"]
            elapsed_before = float(loop["elapsed"])
            history_lines = [ln for ln in payload["history"].split("\n") if ln]
            history = [json.loads(ln) for ln in history_lines]
            rng_to_restore, reseed = _rng_of_this_rank(path, payload, world)
            if main:
                log.info("%s: resumed from %s at step %d/%d", desc, path, done, total)
    if checkpoint_dir is not None and main:
        ckpt.remove_stale_temporaries(checkpoint_dir)
    if order is None:
        order = torch.randperm(len(x), generator=g)
    if rng_to_restore is not None:
        ckpt.restore_rng(rng_to_restore)  # last: nothing after this point may draw random numbers before the loop
        if reseed:  # a checkpoint of another world size: fresh, still distinct, attack streams per rank
            torch.manual_seed(int(torch.randint(2**62, ())) + distributed.rank())

    start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def save(steps_done: int) -> Path:
        """Write a checkpoint on rank 0 (every rank must call this: it gathers their RNG states); returns its path."""
        rng = ckpt.capture_rng()
        rng_ranks = distributed.gather_objects(rng) if world > 1 else None  # attack random streams differ by rank
        if not main:
            return distributed.broadcast_object(None)
        payload = {
            "state": {name: obj.state_dict() for name, obj in stateful.items()},
            "loop": {
                "order": order,
                "generator": g.get_state(),
                "bad_streak": bad_streak,
                "bad_total": bad_total,
                "elapsed": elapsed(),
                **loop_identity,
            },
            "rng": rng,
            **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
            "history": "\n".join(history_lines),
            "config": json.dumps(config_json),
            "environment": json.dumps(env),
        }
        path = ckpt.save_checkpoint(checkpoint_dir, payload, step=steps_done, keep_last=keep_last)  # type: ignore[arg-type]
        return distributed.broadcast_object(path)  # also holds the other ranks until the file is written

    model.train()
    bar = tqdm(total=total, initial=min(done, total), desc=desc, disable=not (progress and main) or None, leave=False)
    stopper = _StopOnSignal()
    last_saved: tuple[int, Path | None] = (done, None)  # (step, file) of the newest checkpoint written here
    try:
        with stopper.installed(checkpoint_dir is not None):
            for i in range(done, total):
                epoch, pos = divmod(i, per_epoch)
                if pos == 0 and i > 0:
                    order = torch.randperm(len(x), generator=g)
                idx = order[pos * batch_size : (pos + 1) * batch_size].to(x.device)
                record = step(x[idx], y[idx])
                bad = bool(record.get("skipped", False)) or not math.isfinite(record["loss"])
                bad_streak = bad_streak + 1 if bad else 0
                bad_total += bad
                record = {"step": i + 1, "epoch": epoch, **record, "bad_steps": bad_total, "seconds": elapsed()}
                history.append(record)
                history_lines.append(json.dumps(record))
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                if bad and main:
                    log.warning(
                        "%s step %d: non-finite loss or gradient (loss %s)%s; %d in a row, %d in total",
                        desc, i + 1, record["loss"], ", update skipped" if record.get("skipped") else "",
                        bad_streak, bad_total,
                    )  # fmt: skip
                if bad and max_bad_steps is not None and bad_streak >= max_bad_steps:
                    raise NonFiniteLossError(
                        f"{desc} stopped at step {i + 1}: {bad_streak} consecutive steps had a non-finite loss "
                        f"or gradient (max_bad_steps={max_bad_steps}). Their updates were skipped, so the model "
                        f"holds the parameters after step {i + 1 - bad_streak}. Usual causes: a learning rate "
                        "too high (outer_lr, inner_lr), an attack producing NaN, or a model whose logits overflow.",
                        history,
                    )
                if main and ((i + 1) % log_every == 0 or i + 1 == total):
                    log.info("%s step %d/%d loss %.4f (%.1fs)", desc, i + 1, total, record["loss"], record["seconds"])
                if checkpoint_dir is not None and ((i + 1) % checkpoint_every == 0 or i + 1 == total):
                    last_saved = (i + 1, save(i + 1))
                signum = distributed.max_over_ranks(stopper.signum or 0)  # ranks stop together, at the same step
                if signum:
                    path = None
                    if checkpoint_dir is not None:
                        path = last_saved[1] if last_saved[0] == i + 1 else save(i + 1)
                    raise TrainingInterrupted(signum, i + 1, path, history)
    finally:
        bar.close()
    model.eval()
    return TrainResult(model=model, history=history, seconds=elapsed())


def _load_for_resume(resume: bool | str | Path, directory: str | Path | None) -> tuple[Path, dict[str, Any]] | None:
    if resume is True:
        found = ckpt.latest_checkpoint(directory)  # type: ignore[arg-type]
        if found is None:
            log.info("no checkpoint in %s yet: starting from step 0", directory)
        return found
    return Path(resume), ckpt.load_checkpoint(resume)  # type: ignore[arg-type]


def _rng_of_this_rank(path: Path, payload: dict[str, Any], world: int) -> tuple[dict[str, Any], bool]:
    """The saved RNG state this rank restores, and whether to re-seed it (a checkpoint of another world size)."""
    ranks = payload.get("rng_ranks")
    saved_world = len(ranks) if ranks else 1
    if saved_world == world:
        return (ranks[distributed.rank()] if ranks else payload["rng"]), False
    if distributed.is_main():
        log.warning(
            "%s was written by %d process(es), resuming with %d: the tasks are split differently and the attack "
            "random starts differ, so the run continues but does not repeat bit for bit", path, saved_world, world,
        )  # fmt: skip
    return payload["rng"], world > 1  # more than one rank: re-seed, or every rank would draw rank 0's starts


def _check_same_run(path: Path, payload: dict[str, Any], config: Any, loop_identity: dict[str, Any]) -> None:
    missing = {"state", "loop", "rng", "history", "config"} - set(payload)
    if missing:
        raise ckpt.CheckpointError(f"{path} lacks {sorted(missing)}: not a training checkpoint")
    saved = {k: payload["loop"].get(k) for k in loop_identity}
    diffs = _config_differences(json.loads(payload["config"]), config) + _config_differences(saved, loop_identity)
    if diffs:
        raise ckpt.CheckpointError(
            f"cannot resume from {path}: the run differs from the one that wrote it ({'; '.join(diffs)}). "
            "Resume with the same settings, or start a new run in another directory."
        )


def _load_state(path: Path, payload: dict[str, Any], stateful: Mapping[str, Any]) -> None:
    saved = payload["state"]
    missing = sorted(set(stateful) - set(saved))
    if missing:
        raise ckpt.CheckpointError(f"{path} has no saved state for {missing} (it holds {sorted(saved)})")
    for name, obj in stateful.items():
        try:
            obj.load_state_dict(saved[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"{path}: the saved {name!r} state does not fit this run: {e}") from None
    extra = sorted(set(saved) - set(stateful))
    if extra:
        log.warning("%s holds state for %s that this run does not use; ignored", path, extra)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Inside: deterministic cuDNN/cuBLAS kernels (GPU runs repeat exactly); the previous flags are restored after.

    Sets ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a deterministic
    kernel warns instead of failing), ``cudnn.deterministic=True``, ``cudnn.benchmark=False`` and, if
    unset, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``. CPU runs are deterministic without it.
    """
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def update_if_finite(
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    params: Iterable[Tensor],
    buffers: Mapping[str, Tensor],
    before: Mapping[str, Tensor],
    extra: Sequence[Tensor] = (),
    *,
    sum_over_ranks: bool = False,
) -> tuple[list[float], bool]:
    """Back-propagate ``loss`` and step ``optimizer`` only if the loss and the gradient norm are finite.

    Otherwise the gradients are dropped and ``buffers`` (BatchNorm statistics) are restored from
    ``before``, so a bad step changes nothing. Returns ``([loss, grad_norm, *extra], skipped)`` read
    from the device in one host sync (``extra``: scalar tensors to log with the step).
    ``sum_over_ranks``: under torchrun, ``loss`` is this rank's share and the loss and gradients are
    summed over ranks before the check, so every rank takes the same decision and the same step.
    """
    params = list(params)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sum_over_ranks:
        loss = distributed.all_reduce_gradients(params, loss)
    norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=loss.device)
    stats = torch.stack([loss.detach(), grad_norm, *extra]).tolist()
    skipped = not (math.isfinite(stats[0]) and math.isfinite(stats[1]))
    if skipped:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(before[k])
    else:
        optimizer.step()
    return stats, skipped


def wrap_model(model: nn.Module, config: MetaConfig, n_types: int) -> nn.Module:
    """The module ``meta_train`` trains for ``config``: ``model`` inside ``film.FiLM`` (``task_encoding``, with
    ``n_types`` attack types) and then ``meta_dropout.MetaDropout`` (``meta_dropout``, the outermost wrapper);
    ``model`` itself when neither option is on. ``cli.load_run`` rebuilds a saved run's layout with it."""
    if config.task_encoding != "none":
        model = FiLM(model, n_types, config.encoding_dim, config.task_encoding)
    return MetaDropout(model, config.meta_dropout) if config.meta_dropout else model


def meta_train(
    model: nn.Module,
    train_data: Dataset | tuple[Tensor, Tensor],
    tasks: AttackDistribution,
    config: MetaConfig | None = None,
    *,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    keep_last: int = 3,
    resume: bool | str | Path = False,
) -> TrainResult:
    """Meta-adversarial training: MAML over the attack types of ``tasks``.

    Args:
        model: any classifier ``nn.Module`` (images in [0, 1] -> logits); trained in place.
        train_data: a Dataset of ``(x (C, H, W) in [0, 1], y)`` or an ``(x, y)`` tuple of tensors.
        tasks: the task distribution p(T).
        config: the algorithm's hyper-parameters (default ``MetaConfig()``).
        progress: show a progress bar (on a terminal).
        checkpoint_dir: directory for checkpoints (``None``: none). A checkpoint holds the model's
            parameters and buffers, the optimizer, the task sampler, the data order, all RNG states,
            the history, the config and versions; it is written every ``checkpoint_every`` meta-steps,
            at the end, and on SIGTERM/SIGINT (which then raise ``TrainingInterrupted``).
        keep_last: checkpoint files kept (older ones are deleted).
        resume: ``True``: continue from the newest good checkpoint in ``checkpoint_dir`` (or start if
            there is none); a path: continue from that file. The result equals an uninterrupted run.

    Returns:
        ``TrainResult`` with ``.model`` (the same module, meta-parameters loaded, in eval mode) and
        ``.history``: per meta-step ``loss`` (the meta-loss), ``task_names``, ``task_specs``,
        ``query_loss`` and ``query_acc`` (per task, adversarial query set after adaptation),
        ``grad_norm`` (of the meta-gradient), ``skipped`` (True if the loss or gradient was not finite
        and the update was skipped), ``bad_steps`` (skipped so far), ``seconds``. With
        ``config.learn_inner_lr`` (Meta-SGD), ``.inner_lr`` holds the learned per-parameter inner step
        sizes (name -> tensor shaped like the parameter; pass them as ``adapt(..., lr=result.inner_lr)``).
        They are meta-learned by the outer optimizer (without weight decay), included in ``grad_norm``,
        and saved in checkpoints. With ``config.first_order_until`` or ``config.reuse_every > 1`` the
        checkpoints also hold the meta-step index, and with ``reuse_every > 1`` the pool of crafted sets
        (``reuse.AdversarialPool``); each record's ``crafted`` lists per task whether it was attacked afresh.
        With ``config.task_attention`` each record's ``task_weights`` holds the attention weights of its
        tasks (``loss`` is then the weighted meta-loss) and ``.attention`` the trained
        ``attention.TaskAttention``; docs/meta_options.md gives the objective. With ``config.task_bn``,
        ``.task_bn`` holds BatchNorm statistics per attack type (``task_bn.TaskBatchNorm``, checkpointed),
        for ``evaluate(..., adapt_methods=("task_bn",), task_bn=result.task_bn)``. With ``config.per_step_bn``,
        ``.step_bn`` holds the BatchNorm statistics of inner steps 1..K (``step_bn.StepBatchNorm``, checkpointed;
        the model's own are step 0's), for ``evaluate(..., step_bn=result.step_bn)``. With ``config.meta_dropout``
        the model is wrapped in ``meta_dropout.MetaDropout`` (learned dropout logits, adapted in the inner loop)
        and ``.model`` is that wrapper, around the trained ``model``. With ``config.persistent_generator``
        every ``generator(...)`` task type keeps one generator, trained against the meta-model each time the
        type is sampled (``tasks.PersistentGenerators``, checkpointed; ValueError if ``tasks`` has no such
        type); ``.generators`` holds them. With ``config.task_encoding``, ``.model`` is a ``film.FiLM`` wrapping
        the model you passed, which is trained in place (inside the ``MetaDropout`` wrapper when both are on);
        checkpoints hold the wrapper's state.

    Raises:
        NonFiniteLossError: ``config.max_bad_steps`` consecutive meta-steps were skipped.
        TrainingInterrupted: SIGTERM/SIGINT arrived while checkpointing was on (a checkpoint was saved).
        CheckpointError: a resume from a checkpoint of another run, or no usable checkpoint.
    """
    config = config if config is not None else MetaConfig()
    if not isinstance(config, MetaConfig):
        raise TypeError(f"config must be a MetaConfig, got {type(config).__name__}")
    if not isinstance(tasks, AttackDistribution):
        raise TypeError(f"tasks must be an AttackDistribution, got {type(tasks).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not config.sample_replace and config.tasks_per_batch > len(tasks):
        raise ValueError(
            f"MetaConfig.tasks_per_batch={config.tasks_per_batch} exceeds the {len(tasks)} attack types; "
            "set sample_replace=True or sample fewer tasks"
        )
    _check_fit_options(checkpoint_dir, checkpoint_every, keep_last, resume, config.max_bad_steps)
    device = distributed.setup(resolve_device(config.device))  # under torchrun: join the group, cuda:LOCAL_RANK
    rank, world = distributed.rank(), distributed.world_size()
    if world > 1 and (config.reuse_every > 1 or config.task_attention or config.task_bn or config.per_step_bn):
        raise ValueError("MetaConfig.reuse_every > 1, task_attention, task_bn and per_step_bn are not supported under "
                         "torchrun (they need every rank's pool / tasks / statistics); use one process")  # fmt: skip
    mine = distributed.shard(config.tasks_per_batch, rank, world)  # this rank's tasks of every meta-batch
    per_task = config.support_size + config.query_size
    rows = slice(mine.start * per_task, mine.stop * per_task)  # their clean examples in the shared batch
    torch.manual_seed(config.seed + rank)  # attack random starts, distinct per rank (a resume restores them later)
    model = wrap_model(model, config, len(tasks))  # initialized from config.seed; other ranks get rank 0's (broadcast)
    model.to(device)
    x, y = training_tensors(model, train_data, device)
    params, buffers = state(model)
    distributed.broadcast_tensors([*params.values(), *buffers.values()])  # every rank starts from rank 0's model
    inner_lr = init_inner_lr(model, config.inner_lr, config.inner_params) if config.learn_inner_lr else {}
    attention = (
        TaskAttention(len(tasks), entropy=config.attention_entropy).to(device) if config.task_attention else None
    )
    groups = [{"params": list(params.values())}]
    if inner_lr:
        groups.append({"params": list(inner_lr.values()), "weight_decay": 0.0})  # step sizes: no decay
    if attention is not None:
        groups.append({"params": list(attention.parameters()), "lr": config.attention_lr, "weight_decay": 0.0})
    optimizer = make_optimizer(groups, config.outer_optimizer, config.outer_lr, config.weight_decay)
    meta_params = [*params.values(), *inner_lr.values(), *(attention.parameters() if attention is not None else ())]
    task_rng = torch.Generator().manual_seed(config.seed + 1)  # shared by all ranks: the same tasks everywhere
    counted = config.first_order_until or config.reuse_every > 1  # options that need the meta-step index
    schedule = _StepCount() if counted else None
    pool = AdversarialPool(config.reuse_every, device) if config.reuse_every > 1 else None
    task_bn = TaskBatchNorm(model, buffers, [a.name for a in tasks.types]) if config.task_bn else None
    step_bn = StepBatchNorm(model, buffers, config.inner_steps) if config.per_step_bn else None
    if config.persistent_generator and (world > 1 or (config.batched and config.query_attack == "adapted")):
        raise ValueError("MetaConfig.persistent_generator=True is not built under torchrun, nor with batched=True and "
                         "query_attack='adapted'; use one process and the looped meta-step")  # fmt: skip
    generators = PersistentGenerators(tasks, x[:0]) if config.persistent_generator else None  # built now: restorable

    def step(xb: Tensor, yb: Tensor) -> dict[str, Any]:
        before = {k: b.clone() for k, b in buffers.items()}  # put back if the step is skipped
        task_bn_before = task_bn.state_dict() if task_bn is not None else None
        step_bn_before = step_bn.state_dict() if step_bn is not None else None
        generators_before = copy.deepcopy(generators.state_dict()) if generators is not None else None
        batch = tasks.sample(config.tasks_per_batch, replace=config.sample_replace, generator=task_rng)
        batch = generators.bind(batch) if generators is not None else batch
        index = schedule.take() if schedule is not None else None
        switch = bool(config.first_order_until) and index == config.first_order_until and not config.first_order
        if switch and distributed.is_main():
            log.info("meta-step %d: switching from first-order to second-order meta-gradients", index + 1)
        crafted = None
        if pool is not None:
            crafted = [pool.fresh(key, index) is None for key in pool.keys([t.type_index for t in batch])]
        out = meta_batch_loss(model, params, buffers, batch[mine], xb[rows], yb[rows], config, step=index,
                              inner_lr=inner_lr or None, pool=pool, attention=attention, task_bn=task_bn,
                              step_bn=step_bn)  # fmt: skip
        query = distributed.gather_tasks(torch.stack([out.query_loss, out.query_acc]))  # (2, all tasks)
        # out.loss is the mean over this rank's tasks: / world makes the sum over ranks the mean over all tasks
        n = len(batch)
        extra = [*query[0], *query[1]]
        if attention is None:
            objective = out.loss / world
        else:  # one backward: theta gets the weighted meta-loss's gradient, the attention network its own loss's
            objective = out.loss + out.attention_loss
            extra += [*out.task_weights, out.loss.detach()]
        stats, skipped = update_if_finite(optimizer, objective, meta_params, buffers, before, extra=extra,
                                          sum_over_ranks=world > 1)  # fmt: skip
        if not skipped:
            distributed.average_buffers(buffers, before)  # BatchNorm statistics: the mean over ranks
        elif task_bn is not None:
            task_bn.load_state_dict(task_bn_before)  # a skipped step changes nothing
        if skipped and step_bn is not None:
            step_bn.load_state_dict(step_bn_before)
        if skipped and generators is not None:  # trained against a non-finite model: their update is undone too
            generators.load_state_dict(generators_before)
        return {
            "loss": stats[0] if attention is None else stats[-1],
            "task_names": [t.name for t in batch],
            "task_specs": [t.attack.spec for t in batch],
            "query_loss": stats[2 : 2 + n],
            "query_acc": stats[2 + n : 2 + 2 * n],
            "grad_norm": stats[1],
            "skipped": skipped,
            **({"crafted": crafted} if crafted is not None else {}),
            **({"task_weights": stats[2 + 2 * n : 2 + 3 * n]} if attention is not None else {}),
        }

    run = {
        "method": "meta_train",
        "meta": {
            k: v
            for k, v in config.to_dict().items()
            if k not in RESUMABLE_CHANGES and not (k in LATER_FIELDS and v == getattr(MetaConfig, k))
        },
        "tasks": {
            "specs": [a.spec for a in tasks.types],
            "weights": tasks.weights.tolist(),
            "eps_ranges": [list(r) if r else None for r in tasks.eps_ranges],
        },
        "model": type(model).__name__,
    }
    extra = {"optimizer": optimizer, "task_rng": ckpt.GeneratorState(task_rng), "tasks": tasks}
    extra |= {"inner_lr": _Tensors(inner_lr)} if inner_lr else {}
    extra |= {"meta_step": schedule} if schedule is not None else {}
    extra |= {"adversarial_pool": pool} if pool is not None else {}
    extra |= {"task_attention": attention} if attention is not None else {}
    extra |= {"task_bn": task_bn} if task_bn is not None else {}
    extra |= {"step_bn": step_bn} if step_bn is not None else {}
    extra |= {"generators": generators} if generators is not None else {}
    with deterministic_algorithms(config.deterministic):
        result = fit(
            model, x, y, step, batch_size=config.examples_per_step, epochs=config.epochs, steps=config.steps,
            seed=config.seed, log_every=config.log_every, progress=progress, desc="meta-train", state=extra,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep_last=keep_last, resume=resume,
            max_bad_steps=config.max_bad_steps, config=run,
        )  # fmt: skip
    result.inner_lr = {k: v.detach() for k, v in inner_lr.items()} if inner_lr else None
    result.attention = attention.eval() if attention is not None else None
    result.task_bn = task_bn
    result.step_bn = step_bn
    result.generators = generators
    return result
