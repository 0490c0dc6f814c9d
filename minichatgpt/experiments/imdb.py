"""The classic IMDB sentiment experiment: make GPT-2 continue reviews positively.

``model_name`` / ``reward_model_name`` default to the embedded models that
``dvc repro pretrain train_reward`` builds offline; set them to
``lvwerra/gpt2-imdb`` / ``lvwerra/distilbert-imdb`` (or local directories) to run the
original setup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minichatgpt.params import PPOParams


@dataclass
class PPOConfig(PPOParams):
    """TRL legacy ``PPOConfig``: every ``ppo:`` field of params.yaml (same names and
    defaults as the DVC stages read), plus the models, data set and forward batch size."""

    exp_name: str = "imdb"
    model_name: str = "checkpoints/0"
    """policy: a checkpoint/model directory (relative to the project root) or a hub name."""
    reward_model_name: str = "models/reward"
    """reward: a text-classification model directory or hub name, or module:function."""
    query_dataset: str = "imdb"
    forward_batch_size: int = 16
    """rows per no-grad forward pass (memory only; results do not depend on it)."""
    mini_batch_size: int = 16
    """rows per gradient step (the original notebook's setting)."""

    def ppo_params(self) -> PPOParams:
        """The validated PPO section shared with the DVC stages."""
        names = {f.name for f in dataclasses.fields(PPOParams)}
        params = PPOParams(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
        params.validate()
        return params


config = PPOConfig()

sent_kwargs = {"top_k": None, "function_to_apply": "none", "batch_size": 16}
"""Arguments for the reward model call, as the original notebook's sentiment pipeline."""
