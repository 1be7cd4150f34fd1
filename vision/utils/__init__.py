"""Pipeline helpers behind the Hydra entry points."""

from .pipeline import evaluate, metric_value, train

__all__ = ["evaluate", "metric_value", "train"]
