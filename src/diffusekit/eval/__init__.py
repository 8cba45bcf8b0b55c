"""Evaluation: reading shapes back from pixels and GenEval-style prompt adherence.

Names are loaded on first use, so `python -m diffusekit.eval.detector` runs the module cleanly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DetectedObject": "detector",
    "compare_to_scene": "detector",
    "describe": "detector",
    "detect": "detector",
    "measure_accuracy": "detector",
    "CATEGORIES": "geneval",
    "EvalPrompt": "geneval",
    "EvalReport": "geneval",
    "PromptResult": "geneval",
    "blank_generator": "geneval",
    "check": "geneval",
    "eval_prompts": "geneval",
    "evaluate": "geneval",
    "format_table": "geneval",
    "ground_truth_generator": "geneval",
    "pooled": "geneval",
    "report_from_dict": "geneval",
    "wilson_interval": "geneval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusekit.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffusekit.eval.{_EXPORTS[name]}"), name)
