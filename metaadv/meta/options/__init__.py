"""Meta options: one file each, behind the protocol of ``base.py``; ``OPTIONS`` lists them in the order their
hooks run (and their parameter groups join the meta-optimizer). Adding an option is one file here, its entry
in ``OPTIONS`` and its ``MetaConfig`` field (docs/meta_options.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .attention import AttentionOption
from .base import Aggregate, InnerLoop, MetaOption, OptionSetup
from .consistency import ConsistencyTerm
from .film import TaskEncoding
from .gap import AdaptationGap
from .generators import PersistentGenerators
from .meta_dropout import MetaDropoutOption
from .meta_sgd import MetaSGD
from .reuse import AdversarialPool
from .step_bn import StepBatchNorm
from .task_bn import TaskBatchNorm
from .worst_case import WorstCase
from .zero_shot import ZeroShotTerm

__all__ = [
    "OPTIONS",
    "Aggregate",
    "InnerLoop",
    "MetaOption",
    "OptionSetup",
    "artifact_eval_options",
    "build",
    "check",
    "check_given",
    "load_artifacts",
    "save_artifacts",
    "wrap",
]

# Wrappers first (FiLM inside meta-dropout), then in the order of their hooks and parameter groups.
OPTIONS: tuple[type[MetaOption], ...] = (
    TaskEncoding,
    MetaDropoutOption,
    MetaSGD,
    StepBatchNorm,
    AttentionOption,
    WorstCase,
    ZeroShotTerm,
    ConsistencyTerm,
    TaskBatchNorm,
    AdversarialPool,
    PersistentGenerators,
    AdaptationGap,
)

# artifact name -> the option class that saves, loads and adapts with it
_BY_ARTIFACT = {cls.artifact_name: cls for cls in OPTIONS if cls.artifact_name is not None}


def enabled(config: Any) -> list[type[MetaOption]]:
    """The option classes ``config`` turns on, in ``OPTIONS`` order."""
    return [cls for cls in OPTIONS if cls.enabled(config)]


def check(config: Any, world: int = 1) -> None:
    """Raise ValueError if an option ``config`` turns on cannot run with it (looped/batched) on ``world`` processes."""
    for cls in enabled(config):
        why = cls.refusal(config, world)
        if why is not None:
            raise ValueError(why)


def wrap(model: nn.Module, config: Any, n_types: int) -> nn.Module:
    """The module meta-trained for ``config``: ``model`` inside every enabled option's wrapper (``model`` itself
    when none wraps). ``n_types``: the attack types of the task distribution. Loading a saved run rebuilds it."""
    for cls in enabled(config):
        model = cls.wrap(model, config, n_types)
    return model


def build(config: Any, setup: OptionSetup) -> list[MetaOption]:
    """The options ``config`` turns on, built for ``setup`` (the wrapped model, its buffers, the tasks)."""
    return [cls.build(config, setup) for cls in enabled(config)]


def check_given(config: Any, options: Sequence[MetaOption]) -> None:
    """Raise ValueError unless ``options`` hold exactly one of each registered option ``config`` turns on (an
    option class not in ``OPTIONS``, e.g. one being written, may be passed besides them)."""
    wanted = enabled(config)
    given = [type(o) for o in options if type(o) in OPTIONS]
    if sorted(map(id, wanted)) != sorted(map(id, given)):
        raise ValueError(
            f"the meta options given ({[c.__name__ for c in given]}) must be those the MetaConfig turns on "
            f"({[f'{c.__name__} ({c.field})' for c in wanted]}); build them with meta.options.build"
        )


def save_artifacts(artifacts: Mapping[str, Any]) -> dict[str, Any]:
    """The artifacts a run directory keeps (``meta_state.pt``): name -> tensors and plain values."""
    saved = {name: _BY_ARTIFACT[name].save_artifact(a) for name, a in artifacts.items() if name in _BY_ARTIFACT}
    return {name: value for name, value in saved.items() if value is not None}


def load_artifacts(model: nn.Module, saved: Mapping[str, Any]) -> dict[str, Any]:
    """``save_artifacts``'s inverse, for the run's rebuilt model; ValueError naming an unknown artifact."""
    unknown = sorted(set(saved) - set(_BY_ARTIFACT))
    if unknown:
        raise ValueError(f"unknown meta-option artifacts {unknown}; known: {sorted(_BY_ARTIFACT)}")
    return {name: _BY_ARTIFACT[name].load_artifact(model, value) for name, value in saved.items()}


def artifact_eval_options(artifacts: Mapping[str, Any]) -> dict[str, Any]:
    """``evaluate``'s keyword arguments that adapt with a run's artifacts (e.g. ``adapt_lr`` from Meta-SGD's)."""
    out: dict[str, Any] = {}
    for name, artifact in artifacts.items():
        if name in _BY_ARTIFACT:
            out |= _BY_ARTIFACT[name].eval_options(artifact)
    return out
