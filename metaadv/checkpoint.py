"""Checkpoint files: atomic, checksummed writes that keep the last N; safe loading; RNG state; run provenance.

A checkpoint file is a short text header and a ``torch.save`` payload::

    metaadv-checkpoint 1\\n          magic line and format version
    sha256 <64 hex digits>\\n        checksum of the payload (a torn or corrupted file fails it)
    <payload>                        torch.save of a dict of tensors, numbers, strings, lists and dicts

The payload is read back with ``torch.load(weights_only=True)``, which refuses any pickled object that
could run code. What goes into the payload is up to the caller (``trainer.fit`` saves model, optimizer,
sampler, data order, RNG states, history, config and versions); extra named state dicts are just more
keys. Files are named ``ckpt-<step>.pt`` in one directory; ``latest_checkpoint`` returns the newest file
that passes the checks, warning about each newer one it skips.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import platform
import random
import re
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .validation import check_int

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "GeneratorState",
    "UnsafeCheckpointError",
    "capture_rng",
    "environment",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "write_atomic",
]

FORMAT = 1
_MAGIC = b"metaadv-checkpoint %d\n" % FORMAT
_HEADER = len(_MAGIC) + len(b"sha256 ") + 64 + 1
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, torn, corrupted, of another format, or does not fit the run."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled Python objects that could run code when loaded: refused."""


class CheckpointWarning(UserWarning):
    """A corrupted checkpoint was skipped in favour of an older one."""


def write_atomic(path: str | Path, data: bytes | memoryview | list[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or a list of chunks) to ``path`` so readers see the old file or the new one, never a mix.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path`` and fsyncs the
    directory (so the rename itself survives a power loss).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in data if isinstance(data, list) else [data]:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode(payload: Mapping[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding ``payload``."""
    return b"".join(_encode_chunks(payload))


def _encode_chunks(payload: Mapping[str, Any]) -> list[bytes | memoryview]:
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    body = buffer.getbuffer()  # no copy of a payload that may be hundreds of MB
    return [_MAGIC + b"sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n", body]


def decode(data: bytes, source: str = "checkpoint") -> dict[str, Any]:
    """Check and read the bytes of a checkpoint file; raises ``CheckpointError`` / ``UnsafeCheckpointError``."""
    if not data.startswith(_MAGIC):
        if data.startswith(b"metaadv-checkpoint "):
            version = data.split(b"\n", 1)[0].decode(errors="replace")
            raise CheckpointError(f"{source}: format {version!r} is not supported (this metaadv reads {FORMAT})")
        raise CheckpointError(f"{source} is not a metaadv checkpoint (no 'metaadv-checkpoint' header)")
    if len(data) < _HEADER or data[len(_MAGIC) : len(_MAGIC) + 7] != b"sha256 " or data[_HEADER - 1 : _HEADER] != b"\n":
        raise CheckpointError(f"{source} is truncated or corrupted (incomplete header)")
    expected = data[len(_MAGIC) + 7 : _HEADER - 1].decode(errors="replace")
    body = data[_HEADER:]
    if hashlib.sha256(body).hexdigest() != expected:
        raise CheckpointError(f"{source} is truncated or corrupted (checksum mismatch, {len(body)} payload bytes)")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        first = f"it names {found.group(1)}" if found else type(e).__name__
        raise UnsafeCheckpointError(
            f"refused to load {source}: it contains pickled Python objects beyond tensors and plain data, "
            f"which could run code when loaded (torch.load weights_only=True rejected it: {first}). "
            "Only load checkpoints you wrote yourself."
        ) from None
    except Exception as e:  # a payload that passed its checksum but is not a torch file
        raise CheckpointError(f"{source}: unreadable payload ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source}: payload is not a metaadv checkpoint of format {FORMAT}")
    return payload


def save_checkpoint(directory: str | Path, payload: Mapping[str, Any], *, step: int, keep_last: int = 3) -> Path:
    """Write ``payload`` (plus ``format`` and ``step``) to ``directory/ckpt-<step>.pt``; keep the newest ``keep_last``.

    The payload may hold tensors, numbers, strings, ``None`` and lists/tuples/dicts of them (what
    ``state_dict()`` methods return); anything else would be refused when loading, so it is refused here.
    """
    check_int(step, "step", minimum=0)
    check_int(keep_last, "keep_last")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{step:08d}.pt"
    write_atomic(path, _encode_chunks({**payload, "format": FORMAT, "step": step}))
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest step first (temporary files of interrupted writes excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete temporary files left by writes that were killed before their rename."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(".ckpt-*.pt.tmp-*"):
            p.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one checkpoint file safely (checksum, then ``torch.load(weights_only=True)``) onto the CPU.

    Raises ``CheckpointError`` for a missing, torn, corrupted or foreign file and
    ``UnsafeCheckpointError`` for a file holding pickled objects that could run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return decode(path.read_bytes(), str(path))


def latest_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that passes its checks, as ``(path, payload)``; ``None`` if none exist.

    A torn or corrupted newer file is skipped with a ``CheckpointWarning``. An unsafe file (pickled
    objects) is never skipped silently: ``UnsafeCheckpointError`` is raised. If every file is bad,
    ``CheckpointError`` is raised rather than starting over.
    """
    paths = list_checkpoints(directory)
    errors = []
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"skipping {e}; trying the previous checkpoint", CheckpointWarning, stacklevel=2)
    if paths:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(errors))
    return None


class GeneratorState:
    """Adapts a ``torch.Generator`` to the ``state_dict()`` / ``load_state_dict()`` protocol of checkpoints."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["state"])


def capture_rng() -> dict[str, Any]:
    """The global random states: torch CPU, every CUDA device (if CUDA is in use), numpy and Python ``random``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore the random states captured by ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the checkpoint holds RNG states of {len(cuda)} CUDA devices but {torch.cuda.device_count()} "
                "are visible: CUDA random streams are not restored, so the run will not repeat exactly",
                CheckpointWarning,
                stacklevel=2,
            )


def _git_commit() -> dict[str, Any] | None:
    """The git commit of the metaadv source tree, when it is a git checkout (never raises)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        run = {"cwd": root, "capture_output": True, "text": True, "timeout": 10, "check": True}
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment() -> dict[str, Any]:
    """Provenance of a run: package versions, git commit (if a checkout), and the hardware it ran on."""
    from . import __version__  # late: the package imports this module

    cuda = torch.cuda.is_available()
    return {
        "metaadv": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": _git_commit(),
        "hardware": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        },
    }


def load_tensors(path: str | Path, what: str, instead: str = "only files you trust") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, for a file of tensors that is not a checkpoint (a run's
    weights, a data file): ``UnsafeCheckpointError`` if it holds pickled objects beyond tensors (``instead``:
    what to save or load instead, for the message), ``CheckpointError`` if it is not readable as ``what``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains pickled Python objects beyond tensors, which could run code "
            f"when loaded (torch.load weights_only=True rejected it). Load {instead}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable {what} file: {e}") from None
