"""Training for convfirst-jax models: ``python -m train`` or ``train.fit(TrainConfig(...))``.

    from train import TrainConfig, fit
    result = fit(TrainConfig(model="convnext_atto", steps=600))
    result.summary["best_val_acc"], result.model   # eval-mode model with the final weights
"""

from train.checkpoint import CheckpointError
from train.config import TrainConfig
from train.data import DataError
from train.loop import FitResult, fit

__all__ = ["CheckpointError", "DataError", "FitResult", "TrainConfig", "fit"]
