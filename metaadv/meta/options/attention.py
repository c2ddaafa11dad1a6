"""Task attention: a small network that weights the tasks of a meta-batch, L_meta = sum_i a_i * L_i.

The weights a = softmax_i(s_i) are positive and sum to 1 over the T tasks of a meta-batch; the score s_i
of task i comes from a 2-layer MLP reading a learned embedding of the task's attack type and the task's
statistics (``TASK_STATISTICS``). Two players share the meta-batch's losses L (T,):

    meta-parameters theta:   minimize  sum_i stop(a_i) * L_i(theta)              (``weighted_meta_loss``)
    attention network phi:   maximize  sum_i a_i(phi) * stop(L_i) + tau * H(a)   (``TaskAttention.attention_loss``)

with H(a) = -sum_i a_i log a_i and tau = ``entropy`` > 0. For fixed losses the attention objective is
strictly concave on the simplex with optimum a* = softmax(L / tau): harder tasks get exponentially more
weight, and the entropy bonus keeps every task's weight positive (no collapse onto the hardest one;
tau -> infinity gives plain MAML's uniform weights, tau -> 0 the worst case). The two losses are
detached so that each player only moves its own parameters: summing them and calling ``backward`` once
gives theta the gradient of the first and phi the gradient of the second. See docs/meta_options.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...functional import Params, call, clone_buffers
from ...tasks import AttackTask
from ...validation import check_int
from ...views import to_device
from ..sets import TaskSets
from .base import Aggregate, MetaOption, OptionSetup

__all__ = ["TASK_STATISTICS", "AttentionOption", "TaskAttention", "task_statistics", "weighted_meta_loss"]

# Per-task statistics the network reads, in column order of ``stats`` (see ``task_statistics``).
TASK_STATISTICS = (
    "query_loss_before",  # query loss at the meta-parameters (before adaptation)
    "query_loss_after",  # query loss at the adapted copy
    "support_loss",  # support loss at the meta-parameters (what the inner loop descends)
    "accuracy_gap",  # query accuracy of the adapted copy minus that of the meta-parameters, in [-1, 1]
)
_N_LOSSES = 3  # the first three columns are losses (>= 0), normalized by their meta-batch mean


def task_statistics(
    *,
    query_loss_before: Tensor,
    query_loss_after: Tensor,
    support_loss: Tensor,
    query_acc_before: Tensor,
    query_acc_after: Tensor,
) -> Tensor:
    """The (T, len(TASK_STATISTICS)) statistics of a meta-batch from (T,) tensors, detached, in column order.

    Accuracies are fractions in [0, 1]; the gap column is ``query_acc_after - query_acc_before``.
    """
    given = (query_loss_before, query_loss_after, support_loss, query_acc_before, query_acc_after)
    if any(not isinstance(c, Tensor) or c.ndim != 1 or c.shape != given[0].shape for c in given):
        raise ValueError(f"task_statistics needs five tensors of one shape (T,), got {[_describe(c) for c in given]}")
    gap = query_acc_after - query_acc_before
    return torch.stack([query_loss_before, query_loss_after, support_loss, gap], dim=1).detach()


def weighted_meta_loss(weights: Tensor, losses: Tensor) -> Tensor:
    """The meta-parameters' loss sum_i stop(a_i) * L_i: a scalar with no gradient to the attention network.

    weights: (T,) from ``TaskAttention`` (detached here); losses: (T,) per-task query losses with their
    graph to the meta-parameters (kept). With uniform weights 1/T it is the plain mean of MAML.
    """
    _check_pair(weights, losses)
    return (weights.detach() * losses).sum()


class TaskAttention(nn.Module):
    """Weights a (T,) over the tasks of a meta-batch: positive, summing to 1 (softmax over the tasks).

    Args:
        n_types: the number of known attack types; type indices are 0..n_types-1, and ``n_types``
            (``self.unknown_type``) codes a type never seen in training.
        hidden: width of the MLP's hidden layer and of the type embedding.
        entropy: tau > 0, the weight of the entropy bonus in ``attention_loss`` (in units of the loss:
            the optimum for fixed losses is softmax(L / tau)).

    Features of task i (``hidden + len(TASK_STATISTICS)`` numbers): the embedding of its type index, then
    each loss statistic divided by its mean over the meta-batch, minus 1 (relative hardness: scale-free,
    zero-mean, within [-1, T - 1], so the falling loss scale of a training run neither saturates the MLP
    nor shifts its inputs; all zero when every loss of a column is zero), then the accuracy gap as given
    (already in [-1, 1]; its sign, whether adaptation helps, is kept). Statistics are read as data
    (detached). The score MLP is Linear -> tanh -> Linear without bias (a shared offset cancels in the
    softmax).

    Initialization: the type embeddings and the output layer start at zero, so a fresh module gives
    exactly uniform weights (plain MAML) and types are told apart only as training finds them different.
    The unknown type's embedding is the zero vector and is never trained (``padding_idx``): such a task
    is scored from its statistics alone, as a type with no learned offset.

    Train it with its own optimizer on ``attention_loss``; it is an ``nn.Module``, so ``state_dict`` /
    ``load_state_dict`` carry it in checkpoints.

    Example::

        att = TaskAttention(n_types=3, entropy=0.5)
        a = att(type_index, stats)                          # (T,), type_index (T,) long, stats (T, 4)
        (weighted_meta_loss(a, losses) + att.attention_loss(a, losses)).backward()
        meta_opt.step(); att_opt.step()
    """

    def __init__(self, n_types: int, hidden: int = 16, entropy: float = 1.0) -> None:
        super().__init__()
        check_int(n_types, "TaskAttention.n_types")
        check_int(hidden, "TaskAttention.hidden")
        ok = isinstance(entropy, (int, float)) and not isinstance(entropy, bool) and math.isfinite(entropy)
        if not ok or entropy <= 0:
            raise ValueError(f"TaskAttention.entropy (tau) must be a finite number > 0, got {entropy!r}")
        self.n_types = n_types
        self.entropy = float(entropy)
        self.type_embedding = nn.Embedding(n_types + 1, hidden, padding_idx=n_types)
        self.score = nn.Sequential(
            nn.Linear(hidden + len(TASK_STATISTICS), hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False)
        )
        nn.init.zeros_(self.type_embedding.weight)
        nn.init.zeros_(self.score[-1].weight)

    @property
    def unknown_type(self) -> int:
        """The type index of attack types never seen in training (``n_types``)."""
        return self.n_types

    def forward(self, type_index: Tensor, stats: Tensor, check: bool = True) -> Tensor:
        """Weights (T,) of the tasks: ``type_index`` (T,) integer in [0, n_types]; ``stats`` (T, 4), see
        ``TASK_STATISTICS`` (losses >= 0, gap in [-1, 1], all finite). Differentiable w.r.t. the module only.

        Invalid inputs raise ``ValueError``; non-finite statistics too. ``check=False`` skips the checks and
        their read from the device (a meta-step's own statistics, made finite by the caller)."""
        if check:
            self._check_inputs(type_index, stats)
        stats = stats.detach().to(self.type_embedding.weight.dtype)
        losses = stats[:, :_N_LOSSES]  # (T, 3)
        mean = losses.mean(0, keepdim=True)  # (1, 3)
        relative = torch.where(mean > 0, losses / mean.clamp_min(torch.finfo(mean.dtype).tiny) - 1, 0.0)
        x = torch.cat([self.type_embedding(type_index), relative, stats[:, _N_LOSSES:]], dim=1)  # (T, hidden + 4)
        return torch.softmax(self.score(x).squeeze(1), dim=0)

    def attention_loss(self, weights: Tensor, losses: Tensor) -> Tensor:
        """The attention network's loss -(sum_i a_i * stop(L_i)) - tau * H(a), a scalar to minimize.

        weights: (T,) this module's output (its graph is kept); losses: (T,) the per-task losses that the
        meta-loss weights (detached here: no gradient reaches the meta-parameters). Its minimum over the
        simplex is at softmax(L / tau).
        """
        _check_pair(weights, losses)
        entropy = -torch.special.xlogy(weights, weights).sum()  # H(a); 0 * log 0 = 0
        return -(weights * losses.detach()).sum() - self.entropy * entropy

    def extra_repr(self) -> str:
        return f"n_types={self.n_types}, entropy={self.entropy}"

    def _check_inputs(self, type_index: Tensor, stats: Tensor) -> None:
        if (
            not isinstance(type_index, Tensor)
            or type_index.ndim != 1
            or type_index.dtype not in (torch.long, torch.int)
        ):
            raise ValueError(f"type_index must be a (T,) integer tensor (torch.long), got {_describe(type_index)}")
        if len(type_index) == 0:
            raise ValueError("type_index is empty: a meta-batch needs at least one task")
        shape = (len(type_index), len(TASK_STATISTICS))
        if not isinstance(stats, Tensor) or not stats.is_floating_point() or tuple(stats.shape) != shape:
            raise ValueError(
                f"stats must be a floating tensor of shape {shape} {TASK_STATISTICS}, got {_describe(stats)}"
            )
        gap = stats[:, _N_LOSSES]
        bad = torch.stack([
            ((type_index < 0) | (type_index > self.n_types)).any(),
            ~torch.isfinite(stats).all(),
            (stats[:, :_N_LOSSES] < 0).any(),
            (gap.abs() > 1).any(),
        ]).tolist()  # fmt: skip  # one read from the device
        if bad[0]:
            raise ValueError(
                f"type_index must lie in [0, {self.n_types}] ({self.n_types} known types, {self.n_types} = unknown), "
                f"got {type_index.tolist()}"
            )
        if bad[1]:
            raise ValueError(f"stats must be finite, got {stats.tolist()} (columns {TASK_STATISTICS})")
        if bad[2]:
            raise ValueError(f"the loss columns of stats must be >= 0, got {stats[:, :_N_LOSSES].tolist()}")
        if bad[3]:
            raise ValueError(f"the accuracy_gap column of stats must lie in [-1, 1], got {gap.tolist()}")


def _check_pair(weights: Tensor, losses: Tensor) -> None:
    if (
        not isinstance(weights, Tensor)
        or not isinstance(losses, Tensor)
        or weights.ndim != 1
        or weights.shape != losses.shape
    ):
        raise ValueError(
            f"weights and losses must be tensors of one shape (T,), got {_describe(weights)} and {_describe(losses)}"
        )


def _describe(x: object) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


class AttentionOption(MetaOption):
    """``MetaConfig.task_attention``: the meta-loss weights the tasks by a ``TaskAttention`` network, trained in
    its own group of the meta-optimizer (lr ``attention_lr``, no weight decay) on its own loss, in one backward
    with the meta-loss. If a statistic is not finite the weights are uniform for the step (then skipped)."""

    field, name, artifact_name, distributed = "task_attention", "task_attention", "attention", False

    def __init__(self, attention: TaskAttention, lr: float) -> None:
        self.attention, self.lr = attention, lr

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return config.task_attention

    @classmethod
    def build(cls, config: Any, setup: OptionSetup) -> AttentionOption:
        attention = TaskAttention(len(setup.tasks), entropy=config.attention_entropy).to(setup.like.device)
        return cls(attention, config.attention_lr)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.attention.parameters()), "lr": self.lr, "weight_decay": 0.0}]

    def state_dict(self) -> dict[str, Tensor]:
        return self.attention.state_dict()

    def load_state_dict(self, saved: Any) -> None:
        self.attention.load_state_dict(saved)

    def artifact(self) -> TaskAttention:
        return self.attention.eval()

    def aggregate(self, model: nn.Module, params: Params, buffers: Params, tasks: Sequence[AttackTask],
                  sets: Sequence[TaskSets], losses: Tensor, query_loss: Tensor,
                  query_acc: Tensor) -> Aggregate:  # fmt: skip
        stats = _attention_statistics(model, params, buffers, sets, query_loss, query_acc)
        types = to_device(torch.tensor([t.type_index for t in tasks]), stats.device)
        # no read from the device: non-finite statistics (a step the engine will skip) are zeroed for the
        # network and turn the objective NaN (+ 0 * their sum), so the step is skipped as a NaN loss's is
        weights = self.attention(types, torch.where(torch.isfinite(stats), stats, 0.0), check=False)
        objective = self.attention.attention_loss(weights, losses) + 0.0 * stats.sum()
        return Aggregate(weights, objective, {"task_weights": weights.detach()})


@torch.no_grad()
def _attention_statistics(
    model: nn.Module, params: Params, buffers: Params, sets: Sequence[TaskSets], query_loss: Tensor, query_acc: Tensor
) -> Tensor:
    """Task attention's (T, 4) statistics: the support and query loss and query accuracy at the meta-parameters
    (forward passes in the model's mode on scratch BatchNorm statistics), with the adapted copies' query
    loss and accuracy. Queries crafted against the adapted copies (``query_attack="adapted"``) are not
    kept, so there the query statistics before adaptation are on the clean query examples."""
    scratch = clone_buffers(buffers)
    before = []
    for s in sets:
        support_logits = call(model, params, scratch, s.support)
        query = s.query if s.query is not None else s.query_clean
        query_logits = call(model, params, scratch, query)
        q_acc = (query_logits.argmax(1) == s.query_y).float().mean()
        before.append(torch.stack([F.cross_entropy(query_logits, s.query_y),
                                   F.cross_entropy(support_logits, s.support_y), q_acc]))  # fmt: skip
    q_loss, s_loss, q_acc = torch.stack(before).unbind(1)
    return task_statistics(query_loss_before=q_loss, query_loss_after=query_loss, support_loss=s_loss,
                           query_acc_before=q_acc, query_acc_after=query_acc)  # fmt: skip
