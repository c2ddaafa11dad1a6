"""Training runs: the one epoch/step loop (data order, progress, logging, history) and ``meta_train``.

Methods differ only in their step function ``step(x, y) -> record``; baselines reuse ``fit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .config import MetaConfig
from .data import to_tensors
from .functional import state
from .meta import meta_batch_loss
from .tasks import AttackDistribution
from .validation import check_labels, check_logits

__all__ = ["TrainResult", "fit", "make_optimizer", "meta_train", "resolve_device"]

log = logging.getLogger(__name__)
StepFn = Callable[[Tensor, Tensor], dict[str, Any]]


@dataclass
class TrainResult:
    """What a training run returns: the trained model (eval mode) and one record per step."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)  # per step: step, epoch, seconds, loss, ...
    seconds: float = 0.0  # wall-clock of the whole run


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
    with torch.no_grad():
        logits = check_logits(model(x[:2]), min(2, len(x)))
    model.train(was_training)
    check_labels(y, len(x), logits.shape[1], "training labels")
    return x, y


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
) -> TrainResult:
    """Run ``step`` over shuffled batches of ``(x, y)`` for ``steps`` (or ``epochs`` full passes).

    Each batch holds ``batch_size`` examples; the last incomplete batch of an epoch is dropped. The data
    order comes from a generator seeded with ``seed``; the model is in training mode during the run
    and in eval mode afterwards.
    """
    per_epoch = len(x) // batch_size
    if per_epoch == 0:
        raise ValueError(f"one step needs {batch_size} examples but the training set has only {len(x)}")
    total = steps if steps is not None else epochs * per_epoch
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress or None, leave=False)
    order = torch.randperm(len(x), generator=g)
    for i in range(total):
        epoch, pos = divmod(i, per_epoch)
        if pos == 0 and i > 0:
            order = torch.randperm(len(x), generator=g)
        idx = order[pos * batch_size : (pos + 1) * batch_size].to(x.device)
        record = step(x[idx], y[idx])
        record = {"step": i + 1, "epoch": epoch, **record, "seconds": time.perf_counter() - start}
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if (i + 1) % log_every == 0 or i + 1 == total:
            log.info("%s step %d/%d loss %.4f (%.1fs)", desc, i + 1, total, record["loss"], record["seconds"])
    bar.close()
    model.eval()
    return TrainResult(model=model, history=history, seconds=time.perf_counter() - start)


def meta_train(
    model: nn.Module,
    train_data: Dataset | tuple[Tensor, Tensor],
    tasks: AttackDistribution,
    config: MetaConfig | None = None,
    *,
    progress: bool = True,
) -> TrainResult:
    """Meta-adversarial training: MAML over the attack types of ``tasks``.

    Args:
        model: any classifier ``nn.Module`` (images in [0, 1] -> logits); trained in place.
        train_data: a Dataset of ``(x (C, H, W) in [0, 1], y)`` or an ``(x, y)`` tuple of tensors.
        tasks: the task distribution p(T).
        config: the algorithm's hyper-parameters (default ``MetaConfig()``).
        progress: show a progress bar (on a terminal).

    Returns:
        ``TrainResult`` with ``.model`` (the same module, meta-parameters loaded, in eval mode) and
        ``.history``: per meta-step ``loss`` (the meta-loss), ``task_names``, ``task_specs``,
        ``query_loss`` and ``query_acc`` (per task, adversarial query set after adaptation), ``seconds``.
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
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)  # attack random starts
    model.to(device)
    x, y = training_tensors(model, train_data, device)
    params, buffers = state(model)
    optimizer = make_optimizer(params.values(), config.outer_optimizer, config.outer_lr, config.weight_decay)
    task_rng = torch.Generator().manual_seed(config.seed + 1)

    def step(xb: Tensor, yb: Tensor) -> dict[str, Any]:
        batch = tasks.sample(config.tasks_per_batch, replace=config.sample_replace, generator=task_rng)
        out = meta_batch_loss(model, params, buffers, batch, xb, yb, config)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        stats = torch.stack([out.loss.detach(), *out.query_loss, *out.query_acc]).tolist()  # one host sync
        n = len(batch)
        return {
            "loss": stats[0],
            "task_names": list(out.task_names),
            "task_specs": list(out.task_specs),
            "query_loss": stats[1 : 1 + n],
            "query_acc": stats[1 + n :],
        }

    return fit(
        model, x, y, step, batch_size=config.examples_per_step, epochs=config.epochs, steps=config.steps,
        seed=config.seed, log_every=config.log_every, progress=progress, desc="meta-train",
    )  # fmt: skip
