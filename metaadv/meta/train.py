"""``meta_train``: the MAML driver. It builds the meta options, hands a meta-step to the engine and collects
the options' artifacts; everything a run needs to resume or skip a step is the engine's.

Under ``torchrun`` (see ``distributed.py`` and docs/scaling.md) the tasks of each meta-batch are split across
the processes and their meta-gradients summed by the engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import checkpoint as ckpt
from .. import distributed
from ..config import MetaConfig
from ..engine import StepFn, StepOutput, Trainable, TrainResult, fit
from ..engine.resume import Checkpointing
from ..engine.setup import deterministic_algorithms, make_optimizer, resolve_device, training_tensors
from ..engine.tensorboard import TensorBoardLogger
from ..functional import state
from ..tasks import AttackDistribution
from . import options as meta_options
from .options.base import MetaOption
from .step import meta_batch_loss

__all__ = ["FIRST_FIELDS", "RESUMABLE_CHANGES", "meta_train"]

log = logging.getLogger(__name__)

# MetaConfig fields a resumed run may change: they do not alter the steps already taken.
RESUMABLE_CHANGES = (
    "steps",
    "epochs",
    "log_every",
    "device",
    "max_bad_steps",
    "batched",
    "vmap_tasks",
    "log_adaptation_gap",
)
# The MetaConfig fields of the first checkpoints, always recorded in a run's identity; every later field is
# recorded only when not at its default, so checkpoints written before it existed still resume.
FIRST_FIELDS = ("tasks_per_batch", "support_size", "query_size", "sample_replace", "inner_steps", "inner_lr",
                "first_order", "query_attack", "clean_weight", "outer_optimizer", "outer_lr", "weight_decay",
                "seed", "deterministic")  # fmt: skip


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
    tensorboard: str | Path | None = None,
) -> TrainResult:
    """Meta-adversarial training: MAML over the attack types of ``tasks``.

    Args:
        model: any classifier ``nn.Module`` (images in [0, 1] -> logits); trained in place.
        train_data: a Dataset of ``(x (C, H, W) in [0, 1], y)`` or an ``(x, y)`` tuple of tensors.
        tasks: the task distribution p(T).
        config: the algorithm's hyper-parameters and its loop (default ``MetaConfig()``).
        progress: show a progress bar (on a terminal).
        checkpoint_dir: directory for checkpoints (``None``: none). A checkpoint holds the model's
            parameters and buffers, the optimizer, the task sampler, every meta option's state, the data
            order, all RNG states, the history, the config and versions; it is written every
            ``checkpoint_every`` meta-steps, at the end, and on SIGTERM/SIGINT (which then raise
            ``TrainingInterrupted``).
        keep_last: checkpoint files kept (older ones are deleted).
        resume: ``True``: continue from the newest good checkpoint in ``checkpoint_dir`` (or start if
            there is none); a path: continue from that file. The result equals an uninterrupted run.
        tensorboard: a TensorBoard log directory (``None``: off): the meta-loss, gradient norm, bad steps,
            learning rates and per-task query loss and accuracy (``query_acc/<task name>``) every
            ``config.log_every`` meta-steps, and the config; a resume continues the same curves
            (``engine/tensorboard.py``, docs/long_jobs.md). Needs ``pip install tensorboard``.

    Returns:
        ``TrainResult`` with ``.model`` (the same module, meta-parameters loaded, in eval mode; inside the
        wrappers of ``task_encoding`` (``FiLM``) and ``meta_dropout`` (``MetaDropout``) when they are on) and
        ``.history``: per meta-step ``loss`` (the meta-loss), ``task_names``, ``task_specs``, ``query_loss``
        and ``query_acc`` (per task, adversarial query set after adaptation), ``grad_norm`` (of the
        meta-gradient), ``skipped`` (True if the loss or gradient was not finite and the update was
        skipped), ``bad_steps`` (skipped so far), ``seconds``; ``reuse_every > 1`` adds ``crafted`` (per task,
        attacked afresh) and ``task_attention`` adds ``task_weights``. ``.artifacts`` holds what the meta
        options learned besides the model, also readable as attributes: ``inner_lr`` (Meta-SGD's step sizes,
        pass them as ``adapt(..., lr=result.inner_lr)``), ``attention`` (the trained ``TaskAttention``),
        ``task_bn`` / ``step_bn`` (per-type and per-step BatchNorm statistics, for ``evaluate``) and
        ``generators`` (the persistent generators); docs/meta_options.md describes each option.

    Raises:
        NonFiniteLossError: ``config.max_bad_steps`` consecutive meta-steps were skipped.
        TrainingInterrupted: SIGTERM/SIGINT arrived while checkpointing was on (a checkpoint was saved).
        CheckpointError: a resume from a checkpoint of another run, or no usable checkpoint.
        ValueError: options that cannot run together (e.g. ``per_step_bn`` with ``batched``), or under torchrun.
    """
    config = _checked(model, tasks, config)
    checkpointing = Checkpointing(checkpoint_dir, checkpoint_every, keep_last, resume)
    logger = TensorBoardLogger(tensorboard) if tensorboard is not None else None
    device = distributed.setup(resolve_device(config.device))  # under torchrun: join the group, cuda:LOCAL_RANK
    rank, world = distributed.rank(), distributed.world_size()
    meta_options.check(config, world)
    torch.manual_seed(config.seed + rank)  # attack random starts, distinct per rank (a resume restores them later)
    model = meta_options.wrap(model, config, len(tasks)).to(device)  # initialized from config.seed
    x, y = training_tensors(model, train_data, device)
    params, buffers = state(model)
    distributed.broadcast_tensors([*params.values(), *buffers.values()])  # every rank starts from rank 0's model
    options = meta_options.build(config, meta_options.OptionSetup(model, buffers, tasks, x[:0]))
    groups = [{"params": list(params.values())}, *(g for o in options for g in o.param_groups())]
    optimizer = make_optimizer(groups, config.outer_optimizer, config.outer_lr, config.weight_decay)
    task_rng = torch.Generator().manual_seed(config.seed + 1)  # shared by all ranks: the same tasks everywhere
    stateful = {o.name: o for o in options if o.stateful}
    trainable = Trainable(
        model, optimizer, [p for g in groups for p in g["params"]],
        state={"task_rng": ckpt.GeneratorState(task_rng), "tasks": tasks, **stateful},
        volatile={name: o for name, o in stateful.items() if o.volatile},
    )  # fmt: skip
    step = _meta_step(model, tasks, config, options, task_rng, rank, world)
    with deterministic_algorithms(config.deterministic):
        result = fit(trainable, x, y, step, config.loop, checkpointing=checkpointing,
                     config=_identity(config, tasks, model), progress=progress, desc="meta-train",
                     logger=logger)  # fmt: skip
    result.artifacts = {o.artifact_name: o.artifact() for o in options if o.artifact_name is not None}
    return result


def _checked(model: Any, tasks: Any, config: MetaConfig | None) -> MetaConfig:
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
    return config


def _meta_step(model: nn.Module, tasks: AttackDistribution, config: MetaConfig, options: list[MetaOption],
               task_rng: torch.Generator, rank: int, world: int) -> StepFn:  # fmt: skip
    """The step the engine runs: sample a meta-batch, this rank's share of its meta-loss, the record."""
    params, buffers = state(model)
    mine = distributed.shard(config.tasks_per_batch, rank, world)  # this rank's tasks of every meta-batch
    per_task = config.support_size + config.query_size
    rows = slice(mine.start * per_task, mine.stop * per_task)  # their clean examples in the shared batch

    def step(xb: Tensor, yb: Tensor, index: int) -> StepOutput:
        batch = tasks.sample(config.tasks_per_batch, replace=config.sample_replace, generator=task_rng)
        switch = config.first_order_until and index == config.first_order_until and not config.first_order
        if switch and distributed.is_main():
            log.info("meta-step %d: switching from first-order to second-order meta-gradients", index + 1)
        out = meta_batch_loss(model, params, buffers, batch[mine], xb[rows], yb[rows], config, options=options,
                              step=index)  # fmt: skip
        query = distributed.gather_tasks(torch.stack([out.query_loss, out.query_acc]))  # (2, all tasks)
        record = {"task_names": [t.name for t in batch], "task_specs": [t.attack.spec for t in batch], **out.record}
        logged = {"query_loss": query[0], "query_acc": query[1], **out.logged}
        if out.objective is None:  # out.loss is this rank's mean: / world makes the sum over ranks the mean
            return StepOutput(out.loss / world, logged, record)
        # one backward: theta gets the meta-loss's gradient, the option's parameters its own loss's
        return StepOutput(out.loss + out.objective, logged, record, loss=out.loss)

    return step


def _identity(config: MetaConfig, tasks: AttackDistribution, model: nn.Module) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote its checkpoint."""
    defaults = MetaConfig()
    meta = {k: v for k, v in config.to_dict().items()
            if k not in RESUMABLE_CHANGES and (k in FIRST_FIELDS or v != getattr(defaults, k))}  # fmt: skip
    return {
        "method": "meta_train",
        "meta": meta,
        "tasks": {
            "specs": [a.spec for a in tasks.types],
            "weights": tasks.weights.tolist(),
            "eps_ranges": [list(r) if r else None for r in tasks.eps_ranges],
        },
        "model": type(model).__name__,
    }
