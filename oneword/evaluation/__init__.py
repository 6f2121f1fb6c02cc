"""Measure learned tokens: oracle identity/editability, CLIP-I/CLIP-T, DINO and cost
(`metrics`), every method in one table (`methods`), the `oneword eval` harness over a
concept suite (`harness`), and the report (`report`)."""

from .harness import EvalConfig, evaluate
from .methods import METHODS, LearnedToken, MethodRun

__all__ = ["METHODS", "EvalConfig", "LearnedToken", "MethodRun", "evaluate"]
