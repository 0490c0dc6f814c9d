"""minichatgpt: reproducible RLHF with PPO as a DVC pipeline.

Heavy imports are lazy so that stages needing only pyarrow/numpy start fast.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every stage process imports this
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"
__all__ = ["Lab", "PPOTrainer"]


def __getattr__(name: str) -> Any:
    if name == "Lab":
        from minichatgpt.lab import Lab

        return Lab
    if name == "PPOTrainer":
        from minichatgpt.trainer import PPOTrainer

        return PPOTrainer
    raise AttributeError(f"module 'minichatgpt' has no attribute {name!r}")
