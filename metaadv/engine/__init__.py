"""The training engine: the one resumable loop every method runs on (data order, progress, logging,
checkpoints, signals, the non-finite skip and its rollback, torchrun).

A method hands ``fit`` a step function ``step(x, y, index) -> StepOutput`` and the state it owns; the
engine back-propagates, checks and applies each update, and owns everything a pre-empted run needs to
continue exactly; ``fit(..., logger=)`` also hands every logged step to a ``RunLogger`` (``tensorboard.py``:
TensorBoard). See docs/long_jobs.md.
"""

from .loop import (
    NonFiniteLossError,
    RunLogger,
    StepFn,
    StepOutput,
    Trainable,
    TrainingInterrupted,
    TrainResult,
    fit,
)
from .setup import deterministic_algorithms, make_optimizer, resolve_device, training_tensors
from .state import NamedTensors

__all__ = [
    "NamedTensors",
    "NonFiniteLossError",
    "RunLogger",
    "StepFn",
    "StepOutput",
    "TrainResult",
    "Trainable",
    "TrainingInterrupted",
    "deterministic_algorithms",
    "fit",
    "make_optimizer",
    "resolve_device",
    "training_tensors",
]
