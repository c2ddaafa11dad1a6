"""A run directory: what ``metaadv train`` writes (``config.json``, ``model.pt``, ``history.jsonl``,
``meta_state.pt``) and how ``metaadv eval`` loads it back (docs/long_jobs.md, "The run directory")."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from . import __version__, models, training_methods
from .checkpoint import CheckpointError, environment, load_tensors, write_atomic
from .config import RunConfig, read_config_file, run_config_from
from .engine import TrainResult
from .meta import options

__all__ = ["load_run", "read_run_config", "save_run", "write_config", "write_history", "write_json"]


def _write(path: Path, write: Any) -> None:
    buffer = io.BytesIO()
    write(buffer)
    write_atomic(path, buffer.getvalue())


def write_config(out: Path, cfg: RunConfig, **run: Any) -> None:
    """Write ``config.json``: the resolved config plus a ``run`` section (versions, git commit, hardware, ``run``)."""
    out.mkdir(parents=True, exist_ok=True)
    info = {"metaadv": __version__, "torch": torch.__version__, "environment": environment(), **run}
    _write(out / "config.json", lambda f: f.write(json.dumps({**cfg.to_dict(), "run": info}, indent=2).encode()))


def write_history(out: Path, history: list[dict]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in history)
    _write(out / "history.jsonl", lambda f: f.write(lines.encode()))


def save_run(out: Path, cfg: RunConfig, result: TrainResult, **run: Any) -> list[str]:
    """Write ``config.json`` (resolved, with versions, git commit, hardware, ``run``), ``model.pt``,
    ``history.jsonl`` and, for a run whose meta options learned adaptation state (their artifacts: Meta-SGD step
    sizes, per-type or per-step BatchNorm statistics), ``meta_state.pt``; returns the names of the files written."""
    write_config(out, cfg, status="done", train_seconds=result.seconds, **run)
    _write(out / "model.pt", lambda f: torch.save(result.model.state_dict(), f))
    state = options.save_artifacts(result.artifacts)
    if state:
        _write(out / "meta_state.pt", lambda f: torch.save(state, f))
    else:  # an earlier run's in the same directory would be loaded with this run's model
        (out / "meta_state.pt").unlink(missing_ok=True)
    write_history(out, result.history)
    return ["model.pt", "config.json", "history.jsonl", *(["meta_state.pt"] if state else [])]


def load_run(checkpoint: Path) -> tuple[RunConfig, torch.nn.Module, dict[str, Any]]:
    """Rebuild a ``metaadv train`` output directory: its config, its trained model (eval mode; weights loaded
    safely) and the ``evaluate`` options that adapt it. For a meta run, its own inner loop: ``adapt_lr``,
    ``adapt_params`` and ``adapt_proximal`` from the config, then what its meta options' artifacts in
    ``meta_state.pt`` give (Meta-SGD's learned ``adapt_lr``, ``task_bn``, ``step_bn``); a baseline run has
    none (``evaluate``'s defaults)."""
    cfg_path, weights = checkpoint / "config.json", checkpoint / "model.pt"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a metaadv run directory (needs config.json and model.pt)")
    cfg = read_run_config(cfg_path)
    meta = training_methods.get(cfg.method).meta  # the meta options apply to meta runs only
    model = models.build(cfg.model)
    if meta:
        model = options.wrap(model, cfg.meta, len(cfg.tasks.get("specs", ())))  # FiLM, meta-dropout
    try:
        model.load_state_dict(load_tensors(weights, "model"))
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{weights} does not fit the model {cfg.model}: {e}") from None
    settings: dict[str, Any] = {"adapt_lr": cfg.meta.inner_lr, "adapt_params": cfg.meta.inner_params,
                                "adapt_proximal": cfg.meta.proximal} if meta else {}  # fmt: skip
    saved = load_tensors(path, "meta state") if (path := checkpoint / "meta_state.pt").is_file() else {}
    try:
        settings |= options.artifact_eval_options(options.load_artifacts(model, saved))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit the model {cfg.model}: {e!r}") from None
    return cfg, model.eval(), settings


def read_run_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig of a run directory's ``config.json`` (without its ``run`` provenance section)."""
    values = read_config_file(path)
    values.pop("run", None)
    return run_config_from(values, overrides)


def write_json(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a report, a summary)."""
    _write(path, lambda f: f.write(text.encode()))
