"""minichatgpt: reproducible RLHF with PPO as a DVC pipeline.

``minichatgpt.Lab`` and ``minichatgpt.PPOTrainer`` (the notebook API) are imported on
first use, so that a stage process, which imports this package too, loads neither them
nor torch before it needs to.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every stage process imports this
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"
__all__ = ["Lab", "PPOTrainer"]

_NOTEBOOK_API = {"Lab": "minichatgpt.notebook.lab", "PPOTrainer": "minichatgpt.notebook.trainer"}


def __getattr__(name: str) -> Any:
    if name in _NOTEBOOK_API:
        import importlib

        return getattr(importlib.import_module(_NOTEBOOK_API[name]), name)
    raise AttributeError(f"module 'minichatgpt' has no attribute {name!r}")
