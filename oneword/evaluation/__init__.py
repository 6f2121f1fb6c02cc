"""Measure learned tokens: oracle identity/editability, CLIP-I/CLIP-T, DINO and cost
(`metrics`), the `oneword eval` harness over a concept suite (`harness`), and the report
(`report`)."""

from .harness import METHODS, EvalConfig, LearnedToken, MethodRun, evaluate, register_method

__all__ = ["METHODS", "EvalConfig", "LearnedToken", "MethodRun", "evaluate", "register_method"]
