"""Training with Ray Train (TorchTrainer + ScalingConfig): any model of the registry."""

from cxrscreen.train.config import AugmentConfig, TrainConfig, class_map_for
from cxrscreen.train.trainer import train

__all__ = ["AugmentConfig", "TrainConfig", "class_map_for", "train"]
