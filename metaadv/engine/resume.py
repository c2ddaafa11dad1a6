"""Checkpoints of a run: what one holds (``Progress``: data order, counters, history), writing one on rank 0,
and finding, checking and loading one to resume from."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from .. import distributed
from ..validation import check_int

__all__ = ["Checkpointing", "Progress", "check_options", "resume_into", "save"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a run checkpoints (``directory=None``: never, and default signal handling)."""

    directory: str | Path | None = None
    every: int = 50  # steps between checkpoints (also written at the last step and on SIGTERM/SIGINT)
    keep_last: int = 3  # checkpoint files kept
    resume: bool | str | Path = False  # True: the newest good checkpoint in directory; a path: that file

    def __post_init__(self) -> None:
        check_options(self.directory, self.every, self.keep_last, self.resume)


def check_options(directory: Any, every: Any, keep_last: Any, resume: Any) -> None:
    check_int(every, "checkpoint_every")
    check_int(keep_last, "keep_last")
    if not isinstance(resume, (bool, str, os.PathLike)):
        raise TypeError(f"resume must be True/False or a checkpoint file path, got {type(resume).__name__}")
    if resume is True and directory is None:
        raise ValueError("resume=True needs checkpoint_dir (the directory to resume from)")


@dataclass
class Progress:
    """How far a run got: the data order and its generator, non-finite step counts, time, and the history."""

    generator: torch.Generator
    identity: dict[str, Any]  # batch_size, seed, n_examples: a resume must match them
    config: Any  # the run's JSON description (normalized), compared on resume
    order: Tensor | None = None
    done: int = 0
    bad_streak: int = 0
    bad_total: int = 0
    elapsed_before: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    history_lines: list[str] = field(default_factory=list)  # one JSON line per record, encoded once

    def add(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.history_lines.append(json.dumps(record))

    def payload(self, state: Mapping[str, Any], elapsed: float, env: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "state": {name: obj.state_dict() for name, obj in state.items()},
            "loop": {
                "order": self.order,
                "generator": self.generator.get_state(),
                "bad_streak": self.bad_streak,
                "bad_total": self.bad_total,
                "elapsed": elapsed,
                **self.identity,
            },
            "history": "\n".join(self.history_lines),
            "config": json.dumps(self.config),
            "environment": json.dumps(env),
        }

    def load(self, payload: Mapping[str, Any]) -> None:
        loop = payload["loop"]
        self.generator.set_state(loop["generator"])
        self.order = loop["order"]
        self.done, self.bad_streak, self.bad_total = payload["step"], loop["bad_streak"], loop["bad_total"]
        self.elapsed_before = float(loop["elapsed"])
        self.history_lines = [ln for ln in payload["history"].split("\n") if ln]
        self.history = [json.loads(ln) for ln in self.history_lines]


def save(checkpointing: Checkpointing, progress: Progress, state: Mapping[str, Any], elapsed: float,
         env: Mapping[str, Any], steps_done: int) -> Path:  # fmt: skip
    """Write a checkpoint on rank 0 (every rank must call this: it gathers their RNG states); returns its path."""
    rng = ckpt.capture_rng()
    world = distributed.world_size()
    rng_ranks = distributed.gather_objects(rng) if world > 1 else None  # attack random streams differ by rank
    if not distributed.is_main():
        return distributed.broadcast_object(None)
    payload = {**progress.payload(state, elapsed, env), "rng": rng}
    if rng_ranks is not None:
        payload["rng_ranks"] = rng_ranks
    path = ckpt.save_checkpoint(checkpointing.directory, payload, step=steps_done, keep_last=checkpointing.keep_last)  # type: ignore[arg-type]
    return distributed.broadcast_object(path)  # also holds the other ranks until the file is written


def resume_into(checkpointing: Checkpointing, progress: Progress, state: Mapping[str, Any], desc: str,
                total: int) -> dict[str, Any] | None:  # fmt: skip
    """Load the checkpoint ``checkpointing.resume`` names into ``state`` and ``progress`` (rank 0 picks it for
    every rank); returns the RNG state to restore just before the loop (and whether to re-seed), or None."""
    main = distributed.is_main()
    found = _find(checkpointing.resume, checkpointing.directory) if main else None
    chosen = distributed.broadcast_object(found[0] if found is not None else None)
    if found is None and chosen is not None:
        found = chosen, ckpt.load_checkpoint(chosen)
    if found is None:
        return None
    path, payload = found
    _check_same_run(path, payload, progress.config, progress.identity)
    _load_state(path, payload, state)
    progress.load(payload)
    if main:
        log.info("%s: resumed from %s at step %d/%d", desc, path, progress.done, total)
    return _rng_of_this_rank(path, payload, distributed.world_size())


def _find(resume: bool | str | Path, directory: str | Path | None) -> tuple[Path, dict[str, Any]] | None:
    if resume is True:
        found = ckpt.latest_checkpoint(directory)  # type: ignore[arg-type]
        if found is None:
            log.info("no checkpoint in %s yet: starting from step 0", directory)
        return found
    return Path(resume), ckpt.load_checkpoint(resume)  # type: ignore[arg-type]


def _rng_of_this_rank(path: Path, payload: dict[str, Any], world: int) -> dict[str, Any]:
    """The saved RNG state this rank restores (``"state"``), and whether to re-seed it (``"reseed"``: a
    checkpoint of another world size)."""
    ranks = payload.get("rng_ranks")
    saved_world = len(ranks) if ranks else 1
    if saved_world == world:
        return {"state": ranks[distributed.rank()] if ranks else payload["rng"], "reseed": False}
    if distributed.is_main():
        log.warning(
            "%s was written by %d process(es), resuming with %d: the tasks are split differently and the attack "
            "random starts differ, so the run continues but does not repeat bit for bit", path, saved_world, world,
        )  # fmt: skip
    return {"state": payload["rng"], "reseed": world > 1}  # more than one rank: re-seed, else all draw rank 0's


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint {saved!r}, now {current!r}"]


def _check_same_run(path: Path, payload: dict[str, Any], config: Any, identity: dict[str, Any]) -> None:
    missing = {"state", "loop", "rng", "history", "config"} - set(payload)
    if missing:
        raise ckpt.CheckpointError(f"{path} lacks {sorted(missing)}: not a training checkpoint")
    saved = {k: payload["loop"].get(k) for k in identity}
    diffs = _differences(json.loads(payload["config"]), config) + _differences(saved, identity)
    if diffs:
        raise ckpt.CheckpointError(
            f"cannot resume from {path}: the run differs from the one that wrote it ({'; '.join(diffs)}). "
            "Resume with the same settings, or start a new run in another directory."
        )


def _load_state(path: Path, payload: dict[str, Any], state: Mapping[str, Any]) -> None:
    saved = payload["state"]
    missing = sorted(set(state) - set(saved))
    if missing:
        raise ckpt.CheckpointError(f"{path} has no saved state for {missing} (it holds {sorted(saved)})")
    for name, obj in state.items():
        try:
            obj.load_state_dict(saved[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"{path}: the saved {name!r} state does not fit this run: {e}") from None
    extra = sorted(set(saved) - set(state))
    if extra:
        log.warning("%s holds state for %s that this run does not use; ignored", path, extra)
