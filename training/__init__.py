"""Flywheel training. For now: the demo digits model in plain PyTorch."""

from flywheel.training.digits import DigitsResult, train_digits

__all__ = ["DigitsResult", "train_digits"]
