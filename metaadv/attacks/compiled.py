"""The attack loop's per-step gradient, eager or under ``torch.compile`` / CUDA graphs (off by default).

    with compiled_attacks("compile"):     # or MetaConfig(compile_attacks="compile") in meta-training
        x_adv = attack(model_fn, x, y)

Attacks need first-order gradients only (d loss / d x_adv), so the loss of the model at x_adv is compiled
(``torch.compile``: TorchDynamo + Inductor, the backward through AOTAutograd) and differentiated with
``torch.autograd.grad`` outside the compiled function; the step, projection and restarts stay eager. Modes:

- ``"off"``: eager (the default).
- ``"compile"``: ``torch.compile(dynamic=None)``: the first batch size is compiled static, a second one
  recompiles once with a dynamic batch dimension. Functional parameters (``torch.func.functional_call``
  closures, new tensors every meta-step) are graph inputs: new values of the same shapes reuse the graph.
  Graph breaks (a model that reads values on the host) split the graph and still run.
- ``"cudagraphs"``: ``mode="reduce-overhead"`` (Inductor's CUDA graph trees) for fixed-shape loops on CUDA.
  It raises on any other device (``RuntimeError``): a CPU run would silently be plain ``"compile"``.

Where compiling fails (a backend or compiler error), the call runs eagerly, one ``RuntimeWarning`` is
issued, and that mode stays eager for the rest of the process.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import ModelFn

__all__ = ["MODES", "compiled_attacks", "current_mode", "loss_gradient"]

MODES = ("off", "compile", "cudagraphs")
_OPTIONS: dict[str, dict[str, Any]] = {"compile": {}, "cudagraphs": {"mode": "reduce-overhead"}}
_MODE: ContextVar[str] = ContextVar("metaadv_compile_attacks", default="off")
_COMPILED: dict[str, Callable[[ModelFn, Tensor, Tensor], Tensor]] = {}
_FAILED: set[str] = set()  # modes whose compilation failed once: eager from then on


@contextlib.contextmanager
def compiled_attacks(mode: str = "compile") -> Iterator[None]:
    """Run the steepest-ascent attacks of the block with their per-step gradient in ``mode`` (:data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def current_mode() -> str:
    """The mode attacks run in here: ``"off"`` outside :func:`compiled_attacks`."""
    return _MODE.get()


def _loss(model_fn: ModelFn, x_adv: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model_fn(x_adv), y, reduction="sum")


def _compile_errors() -> tuple[type[Exception], ...]:
    """What a failed compilation raises (imported on demand: ``torch._dynamo`` takes about 1 s to import)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError


def _compiled(mode: str) -> Callable[[ModelFn, Tensor, Tensor], Tensor]:
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_loss, dynamic=None, **_OPTIONS[mode])
    return _COMPILED[mode]


def _gradient(loss_fn: Callable[[ModelFn, Tensor, Tensor], Tensor], model_fn: ModelFn, x_adv: Tensor,
              y: Tensor) -> Tensor:  # fmt: skip
    leaf = x_adv.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(model_fn, leaf, y), leaf)
    return grad


def loss_gradient(model_fn: ModelFn, x_adv: Tensor, y: Tensor) -> Tensor:
    """Gradient (B, C, H, W) of the summed cross-entropy of ``model_fn`` at ``x_adv`` w.r.t. ``x_adv``, in the
    current mode (:func:`compiled_attacks`). Only ``x_adv`` gets a gradient (no ``.grad`` on parameters)."""
    mode = _MODE.get()
    if mode == "off" or mode in _FAILED:
        return _gradient(_loss, model_fn, x_adv, y)
    if mode == "cudagraphs":
        if x_adv.device.type != "cuda":
            raise RuntimeError(
                f"compile_attacks='cudagraphs' needs CUDA tensors, got images on {x_adv.device.type}: "
                "use 'compile' (torch.compile without CUDA graphs) or 'off'"
            )
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
    try:
        return _gradient(_compiled(mode), model_fn, x_adv, y)
    except _compile_errors() as e:
        _FAILED.add(mode)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(
            f"compile_attacks={mode!r}: compiling the attack gradient failed ({type(e).__name__}: {reason[:200]}); "
            "attacks run eagerly for the rest of this process",
            RuntimeWarning,
            stacklevel=2,
        )
        return _gradient(_loss, model_fn, x_adv, y)
