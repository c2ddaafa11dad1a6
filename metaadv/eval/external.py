"""A model metaadv did not train and its evaluation data, loaded safely: a factory or TorchScript file, weights, (x, y).

``load_model("package.module:factory", "weights.pt")`` calls the factory (no arguments) and loads a state dict
into the module it returns: a ``torch.save`` file read with ``weights_only=True`` (pickled Python objects are
refused) or a ``.safetensors`` file (the ``io`` extra). ``load_model("model.ts")`` loads a TorchScript archive,
which carries its weights. ``load_data`` reads a dataset metaadv knows (its test split) or a ``.pt`` file of
``(x, y)``. ``check_compatible`` runs the model once on the data and says plainly what does not fit. Every error
is a ``ValueError``/``TypeError``/``FileNotFoundError``/``ImportError`` naming what was given and what is expected.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .. import data as _data
from ..checkpoint import CheckpointError, load_tensors
from ..validation import check_images, check_labels

__all__ = ["TORCHSCRIPT_SUFFIXES", "TorchScriptModel", "check_compatible", "load_data", "load_model"]

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")  # a model spec ending so is a TorchScript file, not a factory
_SPEC_FORM = "'package.module:factory' (a callable returning the nn.Module) or a TorchScript file (.pt/.pth/.ts)"


class TorchScriptModel(nn.Module):
    """A TorchScript module as the child ``scripted`` of a plain ``nn.Module``.

    ``torch.func.functional_call``, which ``evaluate`` and ``adapt`` run models through, refuses a scripted
    module at the top level but swaps the tensors of a scripted child, so wrapped it is evaluated and adapted
    with ``"sgd"`` like any model. Its BatchNorm layers are TorchScript modules, not ``nn.BatchNorm2d``: the
    ``"bn"`` adaptation needs the model's Python class (``package.module:factory`` with its weights).
    """

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, x: Tensor) -> Tensor:
        return self.scripted(x)  # (B, num_classes)


def load_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Load a classifier metaadv did not train, in eval mode, on the CPU.

    Args:
        spec: ``"package.module:factory"``: ``factory`` is called with no arguments and returns the
            ``nn.Module`` (the module may be a file in the current directory, ``mymodels.py`` ->
            ``"mymodels:build"``; the current directory is on ``sys.path`` for that import only). Or the path
            of a TorchScript archive ending in ``.pt``, ``.pth`` or ``.ts`` (``torch.jit.save``), returned as
            a :class:`TorchScriptModel`. TorchScript runs its own TorchScript code, not Python; load files
            you trust.
        weights: with a factory, a state dict for the module it returns: a ``.safetensors`` file (needs the
            ``safetensors`` package: ``pip install 'metaadv[io]'``) or a ``torch.save`` file read with
            ``weights_only=True``. Every key and shape must match. ``None``: the factory's own weights.

    Raises:
        ImportError: the module does not exist (or the ``safetensors`` package is missing).
        ValueError: a malformed spec, a missing factory, weights that do not fit (missing/unexpected keys,
            shape mismatches, all listed), a file that is not a TorchScript archive.
        TypeError: a factory that is not callable, needs arguments or returns anything but an ``nn.Module``.
        FileNotFoundError: a TorchScript or weights file that does not exist.
        metaadv.checkpoint.UnsafeCheckpointError: a weights file holding pickled Python objects.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"a model spec must be {_SPEC_FORM}, got {spec!r}")
    if spec.endswith(TORCHSCRIPT_SUFFIXES):
        if weights is not None:
            raise ValueError(f"{spec} is a TorchScript file, which carries its weights: give no weights with it")
        return _load_torchscript(Path(spec))
    if ":" not in spec:
        raise ValueError(f"model spec {spec!r} must be {_SPEC_FORM}")
    module_name, _, factory_name = spec.partition(":")
    if not all(p.isidentifier() for p in module_name.split(".")) or not factory_name.isidentifier():
        raise ValueError(f"model spec {spec!r} must be {_SPEC_FORM}")
    model = _build(spec, _import(spec, module_name), factory_name)
    if weights is not None:
        _load_weights_into(model, Path(weights), spec)
    return model.eval()


def load_data(name_or_path: str | Path, data_root: str | None = None) -> tuple[Tensor, Tensor]:
    """Evaluation data ``(x (N, C, H, W) float in [0, 1], y (N,) int64)``.

    Args:
        name_or_path: a dataset metaadv knows (``metaadv.data.NAMES``: its test split), or a file saved with
            ``torch.save`` holding ``(x, y)`` (a tuple or list) or a dict with ``"x"`` and ``"y"`` tensors,
            read with ``weights_only=True``.
        data_root: where torchvision datasets are stored (see ``metaadv.data.load``).

    Raises:
        FileNotFoundError: neither a known dataset nor an existing file.
        TypeError, ValueError: a file holding something else, images not float (B, C, H, W) in [0, 1], labels
            not integer class indices (N,).
        metaadv.checkpoint.UnsafeCheckpointError: a file holding pickled Python objects.
    """
    if isinstance(name_or_path, str) and name_or_path in _data.NAMES:
        return _data.to_tensors(_data.load(name_or_path, data_root)[1])
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data {str(name_or_path)!r} is neither a dataset metaadv knows ({', '.join(_data.NAMES)}) nor a file "
            "(a torch.save of (x, y) or {'x': x, 'y': y})"
        )
    saved = _load_tensors(path, "data", "tensors only: (x, y) or {'x': x, 'y': y}")
    if isinstance(saved, Mapping) and {"x", "y"} <= set(saved):
        x, y = saved["x"], saved["y"]
    elif isinstance(saved, (tuple, list)) and len(saved) == 2:
        x, y = saved
    else:
        keys = f" with keys {sorted(map(str, saved))}" if isinstance(saved, Mapping) else ""
        raise TypeError(
            f"{path} must hold (x, y) or {{'x': x, 'y': y}}: images (N, C, H, W) in [0, 1] and labels (N,); "
            f"it holds a {type(saved).__name__}{keys}"
        )
    x = check_images(x, f"the images in {path}")
    return x, check_labels(y, len(x), None, f"the labels in {path}")


def check_compatible(
    model: nn.Module, x: Tensor, y: Tensor, *, model_name: str = "the model", data_name: str = "the data"
) -> int:
    """Run ``model`` once on two images of ``x`` and return its number of classes.

    Raises ValueError, naming ``model_name`` and ``data_name``, when the model fails on images of that
    shape, returns something other than float logits (batch, num_classes), or has fewer classes than the
    labels ``y`` need (max label + 1).
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    probe = x[:2].to(dtype)  # (2, C, H, W)
    try:
        with torch.no_grad():
            out = model(probe)
    except RuntimeError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(
            f"{model_name} failed on images of shape {tuple(probe.shape)[1:]} from {data_name}: "
            f"{lines[-1] if lines else type(e).__name__}"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != len(probe) or not out.is_floating_point():
        got = f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{model_name} must return float logits of shape (batch, num_classes); on a batch of {len(probe)} "
            f"images from {data_name} it returned {got}"
        )
    classes, needed = out.shape[1], int(y.max()) + 1
    if classes < needed:
        raise ValueError(
            f"{data_name} has labels up to {needed - 1} ({needed} classes) but {model_name} outputs {classes} "
            f"logits per image: it must have at least {needed}"
        )
    return classes


def _import(spec: str, module_name: str) -> ModuleType:
    """Import ``module_name`` with the current directory first on ``sys.path`` (for that import only)."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module file written since the last import in this process is found
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(f"{e.name}.")):
            raise  # the module exists but an import inside it failed: the traceback points into it
        raise ImportError(
            f"model spec {spec!r}: no module named {e.name!r} in the current directory ({cwd}) or the installed "
            "packages"
        ) from None
    finally:
        sys.path.remove(cwd)  # the first occurrence: the one inserted above


def _build(spec: str, module: ModuleType, factory_name: str) -> nn.Module:
    """Call the factory (no arguments) and check that it returned an ``nn.Module``."""
    factory = getattr(module, factory_name, None)
    if factory is None:
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(
            f"model spec {spec!r}: module {module.__name__!r} has no {factory_name!r}; its callables: "
            f"{', '.join(names[:20]) or 'none'}"
        )
    if not callable(factory):
        raise TypeError(f"model spec {spec!r}: {factory_name} is not callable (its type: {type(factory).__name__}); "
                        "give a function or class that returns an nn.Module")  # fmt: skip
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise TypeError(
            f"model spec {spec!r}: {factory_name}{inspect.signature(factory)} needs arguments, but it is called "
            "with none: write a function that builds the model with them"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model spec {spec!r}: {factory_name}() returned a {type(model).__name__}, not a "
                        "torch.nn.Module")  # fmt: skip
    return TorchScriptModel(model) if isinstance(model, torch.jit.ScriptModule) else model


def _load_torchscript(path: Path) -> TorchScriptModel:
    if not path.is_file():
        raise FileNotFoundError(f"no TorchScript file {path} (a model spec ending in .pt/.pth/.ts is a path)")
    if not _is_torchscript(path):
        raise ValueError(
            f"{path} is not a TorchScript archive (torch.jit.save). If it holds a state dict, give the model "
            f"as 'package.module:factory' and {path} as its weights"
        )
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as e:
        raise ValueError(f"{path} is not a readable TorchScript archive: {e}") from None
    return TorchScriptModel(scripted).eval()


def _is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript code and constants (a ``torch.save`` zip has neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names)


def _load_tensors(path: Path, what: str, instead: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: pickled Python objects refused (``instead``: what to
    save), clear errors."""
    if _is_torchscript(path):
        raise ValueError(f"{path} is a TorchScript archive, not {what}: give it as the model spec alone")
    return load_tensors(path, what, f"a file that holds {instead}")


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    if path.suffix != ".safetensors":
        return _load_tensors(path, "weights", "the model's state_dict(), not the model")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"reading {path} needs the safetensors package: pip install 'metaadv[io]'") from None
    try:
        return load_file(path, device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _load_weights_into(model: nn.Module, path: Path, spec: str) -> None:
    """``model.load_state_dict`` of the file, strict, after listing every key and shape that does not fit."""
    weights = _read_state_dict(path)
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        inner = [k for k, v in weights.items() if not isinstance(v, Tensor)] if isinstance(weights, Mapping) else []
        what = f"a dict with non-tensor values at {inner[:5]}" if inner else f"a {type(weights).__name__}"
        raise TypeError(f"{path} must hold a state dict (parameter name -> tensor), got {what}; save "
                        "model.state_dict() alone")  # fmt: skip
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k}: {tuple(weights[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in own.items() if k in weights and weights[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        problems = [f"{len(missing)} missing key(s) {_few(missing)}" if missing else "",
                    f"{len(unexpected)} unexpected key(s) {_few(unexpected)}" if unexpected else "",
                    f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:5])}" if shapes else ""]  # fmt: skip
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (saved from DataParallel/DDP? strip the 'module.' prefix of its keys)"
        raise ValueError(
            f"the weights in {path} do not fit {spec}() ({type(model).__name__}): "
            f"{', '.join(p for p in problems if p)}{hint}"
        )
    model.load_state_dict(weights)


def _few(keys: list[str], n: int = 5) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
