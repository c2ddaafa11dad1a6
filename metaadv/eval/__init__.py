"""Evaluation: robustness of a model to attacks run white-box against it, zero-shot and after few-shot adaptation
(``evaluate``), the report it returns, the adaptations (``adaptation``; the meta-training inner loop, ``matched``;
fine-tuning chosen on validation data, ``tuning``), and a model metaadv did not train with its evaluation data,
loaded safely (``external``)."""

from .adaptation import ADAPT_METHODS, support_bn_statistics
from .evaluate import evaluate
from .external import TorchScriptModel, check_compatible, load_data, load_model
from .matched import InnerLoopSpec
from .report import RobustnessReport
from .tuning import FINETUNE_GRID, Tuning, tune_finetuning

__all__ = [
    "ADAPT_METHODS",
    "FINETUNE_GRID",
    "InnerLoopSpec",
    "RobustnessReport",
    "TorchScriptModel",
    "Tuning",
    "check_compatible",
    "evaluate",
    "load_data",
    "load_model",
    "support_bn_statistics",
    "tune_finetuning",
]
