"""Evaluation: robustness of a model to attacks run white-box against it, zero-shot and after few-shot adaptation
(``evaluate``), the report it returns, the adaptations (``adaptation``), and a model metaadv did not train with its
evaluation data, loaded safely (``external``)."""

from .adaptation import ADAPT_METHODS, support_bn_statistics
from .evaluate import evaluate
from .external import TorchScriptModel, check_compatible, load_data, load_model
from .report import RobustnessReport

__all__ = [
    "ADAPT_METHODS",
    "RobustnessReport",
    "TorchScriptModel",
    "check_compatible",
    "evaluate",
    "load_data",
    "load_model",
    "support_bn_statistics",
]
