"""metaadv: meta-adversarial training, MAML over a distribution of adversarial attack types.

import metaadv as ma
result = ma.meta_train(model, train, ma.AttackDistribution(["fgsm(eps=0.3)"]), ma.MetaConfig())
report = ma.evaluate(result.model, test, ["pgd_l2(eps=2.0)"], adapt_shots=32)
"""

from . import attacks, baselines, data, distributed, models, plots
from .checkpoint import CheckpointError, UnsafeCheckpointError
from .config import LoopConfig, MetaConfig, RunConfig, load_run_config
from .engine import NonFiniteLossError, TrainingInterrupted, TrainResult
from .eval import RobustnessReport, evaluate
from .meta import adapt, meta_train
from .tasks import AttackDistribution, AttackTask
from .training_methods import methods, train

__version__ = "0.1.0"

__all__ = [
    "AttackDistribution",
    "AttackTask",
    "CheckpointError",
    "LoopConfig",
    "MetaConfig",
    "NonFiniteLossError",
    "RobustnessReport",
    "RunConfig",
    "TrainResult",
    "TrainingInterrupted",
    "UnsafeCheckpointError",
    "__version__",
    "adapt",
    "attacks",
    "baselines",
    "data",
    "distributed",
    "evaluate",
    "load_run_config",
    "meta_train",
    "methods",
    "models",
    "plots",
    "train",
]
