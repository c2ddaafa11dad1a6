"""Evaluation: robustness of a model to attacks run white-box against it, zero-shot and after few-shot adaptation
(``evaluate``), the report it returns, and the adaptations (``adaptation``)."""

from .adaptation import ADAPT_METHODS, support_bn_statistics
from .evaluate import evaluate
from .report import RobustnessReport

__all__ = ["ADAPT_METHODS", "RobustnessReport", "evaluate", "support_bn_statistics"]
