"""The one training loop every training stage uses (finetune, sparse, distill)."""
from compress.train.loop import TrainConfig, TrainHook, fit

__all__ = ["TrainConfig", "TrainHook", "fit"]
