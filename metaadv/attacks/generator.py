"""A learned perturbation generator (AdvGAN-style, Xiao et al. 2018, without the discriminator term).

A small convolutional network G maps an image to a perturbation ``lo + (hi - lo) * sigmoid(G(x))`` with
``lo = max(-eps, -x)`` and ``hi = min(eps, 1 - x)``: inside the Linf ball and [0, 1] by construction,
with no clamp (a clamp zeroes the gradient wherever G pushes a pixel past 0 or 1, and on MNIST's black
background that stalled training at the clean accuracy). G is trained by Adam to push the classifier's
margin ``z_y - max_{j != y} z_j`` below zero (clamped at ``-kappa`` so fooled examples stop pulling, as
AdvGAN's C&W loss); maximizing the cross-entropy instead collapsed G onto a constant shift in our runs.

Unlike PGD, the attack is a function of the image that can be kept and reused: :class:`GeneratorAttack`
holds one generator and its optimizer (with ``state_dict`` for checkpoints) and keeps training it at
every call, against whatever model it is called with (``MetaConfig.persistent_generator`` keeps one per
``generator`` task type for a whole meta-training run, see ``tasks.PersistentGenerators``). The registered
``generator(eps=...)`` spec fits a fresh generator to the batch it attacks (``steps`` Adam steps against the
very model being attacked, so evaluation stays white-box and adaptive), then returns its perturbation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import ModelFn
from .norms import per_example
from .registry import register

__all__ = ["GeneratorAttack", "PerturbationGenerator", "generator", "margin_loss"]


class PerturbationGenerator(nn.Module):
    """Three 3x3 convolutions (``width`` channels) from an image (B, C, H, W) to a pre-sigmoid
    perturbation of the same shape; the last layer starts near zero, so G starts near "no perturbation"."""

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1, bias=False),  # a bias drifts to a constant shift
        )  # fmt: skip
        nn.init.normal_(self.net[-1].weight, std=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(2 * x - 1)


def margin_loss(logits: Tensor, y: Tensor, kappa: float = 5.0) -> Tensor:
    """Mean over the batch of ``max(z_y - max_{j != y} z_j, -kappa)``; logits (B, K), y (B,)."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (true - other).clamp_min(-kappa).mean()


class GeneratorAttack:
    """A persistent generator attack: each call takes ``steps`` Adam steps (``lr``) that lower the
    margin of ``model_fn`` on this batch, then returns ``x + perturbation`` (see above).

    ``eps`` in the [0, 1] pixel scale (a float or a (B,) tensor at call time); ``steps=0`` applies the
    generator as it is (e.g. to measure how a trained generator transfers). Built for the channel count,
    device and dtype of ``like`` (any (B, C, H, W) batch, B may be 0) if given, else lazily at the first
    call; ``state_dict``/``load_state_dict`` cover the generator and its optimizer.
    """

    def __init__(
        self, eps: float, *, steps: int = 10, lr: float = 0.01, width: int = 16, like: Tensor | None = None
    ) -> None:  # eps: [0, 1] scale
        self.eps, self.steps, self.lr, self.width = eps, steps, lr, width
        self.net: PerturbationGenerator | None = None
        self.opt: torch.optim.Optimizer | None = None
        if like is not None:
            self._build(like)

    def _build(self, x: Tensor) -> tuple[PerturbationGenerator, torch.optim.Optimizer]:
        if self.net is None or self.opt is None:
            self.net = PerturbationGenerator(x.shape[1], self.width).to(device=x.device, dtype=x.dtype)
            self.opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        return self.net, self.opt

    def perturb(self, x: Tensor, eps: float | Tensor | None = None) -> Tensor:
        """``x + lo + (hi - lo) * sigmoid(G(x))`` (B, C, H, W), in the ball and [0, 1], differentiable in G."""
        net, _ = self._build(x)
        e = per_example(self.eps if eps is None else eps, x)
        lo, hi = torch.maximum(-e, -x), torch.minimum(e, 1 - x)
        return x + lo + (hi - lo) * torch.sigmoid(net(x))

    def __call__(self, model_fn: ModelFn, x: Tensor, y: Tensor, eps: float | Tensor | None = None) -> Tensor:
        x = x.detach()
        net, opt = self._build(x)
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = margin_loss(model_fn(self.perturb(x, eps)), y)
                grads = torch.autograd.grad(loss, list(net.parameters()))  # the model's parameters get no .grad
                for p, g in zip(net.parameters(), grads, strict=True):
                    p.grad = g
                opt.step()
        with torch.no_grad():
            return self.perturb(x, eps).clamp(0, 1)  # only float rounding to remove

    def state_dict(self) -> dict[str, Any]:
        return {"net": None if self.net is None else self.net.state_dict(),
                "opt": None if self.opt is None else self.opt.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], like: Tensor | None = None) -> None:
        """Restore a generator saved by :meth:`state_dict`; ``like`` is a batch giving channels, device, dtype
        (needed only if the generator is not built yet)."""
        if like is not None:
            self._build(like)
        if self.net is None or self.opt is None:
            raise ValueError("GeneratorAttack.load_state_dict: the generator is not built yet, pass like= (a batch)")
        if state["net"] is not None:
            self.net.load_state_dict(state["net"])
            self.opt.load_state_dict(state["opt"])


@register("generator", norm="linf")
def generator(
    model_fn: ModelFn,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    steps: int = 100,
    lr: float = 0.01,
    width: int = 16,
) -> Tensor:
    """A fresh :class:`GeneratorAttack` fitted to this batch: ``steps`` Adam steps (``lr``) lowering
    the margin of ``model_fn``, then its perturbation (Linf ball of radius ``eps``). Much weaker
    than PGD at the same eps (a feed-forward attack): a distinct task type, not a strong evaluator."""
    return GeneratorAttack(1.0, steps=steps, lr=lr, width=width)(model_fn, x, y, eps=eps)
