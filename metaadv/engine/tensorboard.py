"""TensorBoard logging: a run's per-step scalars and config (``TensorBoardLogger``) and evaluations (``log_report``).

    metaadv train --config configs/mnist5k.yaml --out runs/a --tensorboard runs/tb/a
    tensorboard --logdir runs/tb

``TensorBoardLogger`` is the engine's ``RunLogger`` (``fit(..., logger=)``); it needs the optional ``tensorboard``
package (``pip install tensorboard``), imported only when a logger is made. See docs/long_jobs.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import distributed

if TYPE_CHECKING:  # annotations only: the engine imports nothing from the layers below it at run time
    from torch.utils.tensorboard import SummaryWriter

    from ..eval.report import RobustnessReport

__all__ = ["TensorBoardLogger", "flat_hparams", "log_report"]

log = logging.getLogger(__name__)

# Record entries that are bookkeeping, not curves (TensorBoard keeps the wall time of every point itself).
NOT_LOGGED = frozenset({"step", "epoch", "seconds"})


def _summary_writer() -> type[SummaryWriter]:
    """``torch.utils.tensorboard.SummaryWriter``; ImportError saying how to install TensorBoard if it is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "TensorBoard logging (tensorboard=DIR, --tensorboard DIR) needs the tensorboard package: "
            f"pip install tensorboard (or pip install 'metaadv[tensorboard]'); importing it failed: {e}"
        ) from e
    return SummaryWriter


def _log_dir(log_dir: Any) -> Path:
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"tensorboard must be a directory (str or Path), got {type(log_dir).__name__}")
    return Path(log_dir)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``config`` flattened for TensorBoard's hparams: nested keys joined by ``.``; numbers, booleans and strings
    kept, anything else (lists, None) as its JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flat_hparams(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def _per_name(names: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """The mean of ``values`` per name (a meta-batch may sample one attack type more than once)."""
    groups: dict[str, list[float]] = {}
    for name, value in zip(names, values, strict=True):
        groups.setdefault(name, []).append(float(value))
    return {name: math.fsum(vs) / len(vs) for name, vs in groups.items()}


def _write_config(writer: SummaryWriter, config: Mapping[str, Any], step: int) -> None:
    """``config`` as text (a JSON block) and as the run's hyper-parameters (the HParams dashboard, in this run:
    ``add_hparams`` would make a run of its own)."""
    from torch.utils.tensorboard.summary import hparams

    writer.add_text("config", f"```json\n{json.dumps(config, indent=2)}\n```", step)
    for summary in hparams(flat_hparams(config), {"loss": None}):  # experiment, session start, session end
        writer.file_writer.add_summary(summary, step)  # type: ignore[union-attr]


class TensorBoardLogger:
    """The engine's run logger (``fit(..., logger=)``) writing to a TensorBoard directory.

    Per logged step: every number in the step's record (``loss``, ``grad_norm``, ``bad_steps``, ``gp_cos``, ...)
    under its name; every per-task list (``query_loss``, ``query_acc``, ``task_weights``: as long as the record's
    ``task_names``) as one curve per task name, ``<key>/<name>`` (the mean over repeats of a name); the learning
    rates: ``lr`` (the first parameter group's: the model's) and ``lr/<i>`` for further groups. At the start:
    the run's config as text (``config``) and as hyper-parameters (nested keys joined by ``.``).

    A resumed run (``first_step`` > 0) purges the events written after the step it resumes from, so its curves
    continue without duplicate points; a fresh run (``first_step`` 0) purges every earlier event in the directory.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = _log_dir(log_dir)
        self._writer_class = _summary_writer()  # fail before training starts if TensorBoard is missing
        self.writer: SummaryWriter | None = None

    def start(self, config: Mapping[str, Any], first_step: int) -> None:
        """Open the event file; ``first_step``: the steps already done (the first new record is step
        ``first_step + 1``)."""
        written_before = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        if first_step == 0 and written_before:
            log.warning(
                "%s holds events of an earlier run: this run replaces its curves (TensorBoard keeps the first "
                "run's hyper-parameters and config text); use one directory per run", self.log_dir,
            )  # fmt: skip
        self.writer = self._writer_class(str(self.log_dir), purge_step=first_step + 1 if first_step else 0)
        if first_step == 0 or not written_before:  # a resume into the same directory has them already
            _write_config(self.writer, config, first_step)

    def step(self, record: Mapping[str, Any], lrs: Sequence[float]) -> None:
        """Write one step's record (``record["step"]``: its 1-based index) and its learning rates."""
        if self.writer is None:
            raise RuntimeError("TensorBoardLogger.step before start")
        step, names = record["step"], record.get("task_names")
        for key, value in record.items():
            if key in NOT_LOGGED:
                continue
            if _is_number(value):
                self.writer.add_scalar(key, value, step)
            elif names and isinstance(value, list) and len(value) == len(names) and all(map(_is_number, value)):
                for name, mean in _per_name(names, value).items():
                    self.writer.add_scalar(f"{key}/{name}", mean, step)
        for i, lr in enumerate(lrs):
            self.writer.add_scalar("lr" if i == 0 else f"lr/{i}", float(lr), step)

    def flush(self) -> None:
        """Write pending events to disk (the engine calls it after every checkpoint)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def log_report(log_dir: str | Path, report: RobustnessReport, step: int) -> None:
    """Write ``report``'s accuracies as scalars at ``step`` (e.g. the run's last training step): ``eval/clean``,
    ``eval/<attack spec>``, ``eval/union`` and per adaptation method ``eval/<method>@<shots>/<spec>``,
    ``eval/<method>@<shots>/union`` (and ``.../clean``, the mean clean accuracy of the adapted models); the
    report's table as text (``eval/report``). Writes on rank 0 only; appends, purging nothing."""
    writer_class = _summary_writer()
    directory = _log_dir(log_dir)
    if not distributed.is_main():
        return
    writer = writer_class(str(directory))
    try:
        scalars = {"eval/clean": report.clean_acc, **{f"eval/{s}": a for s, a in report.per_attack.items()},
                   "eval/union": report.union_acc}  # fmt: skip
        for method, accs in report.adapted.items():
            column = f"eval/{method}@{report.adapt_shots}"
            scalars |= {f"{column}/{spec}": acc for spec, acc in accs.items()}
            if method in report.adapted_union:
                scalars[f"{column}/union"] = report.adapted_union[method]
            if clean := report.adapted_clean.get(method):
                scalars[f"{column}/clean"] = math.fsum(clean.values()) / len(clean)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        writer.add_text("eval/report", report.to_markdown(), step)
    finally:
        writer.close()
    log.info("wrote %d evaluation scalars at step %d to %s", len(scalars), step, directory)
