"""The seed notebook's experiment: make GPT-2 continue movie reviews positively.

``config`` is TRL's legacy ``PPOConfig``: every ``ppo:`` setting of params.yaml, declared
in :mod:`minichatgpt.params`, with TRL's defaults where the pipeline's differ
(:data:`minichatgpt.params.TRL_DEFAULTS`), plus the models, data set and forward batch size.
``model_name`` / ``reward_model_name`` default to the embedded models that
``dvc repro pretrain train_reward`` builds offline; set them to ``lvwerra/gpt2-imdb`` /
``lvwerra/distilbert-imdb`` (or local directories) to run the original setup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from minichatgpt.params import DTYPE_NAMES, TRL_DEFAULTS, PPOParams, setting


def _trl_default(name: str) -> Any:
    """The ``ppo.<name>`` setting as declared, with TRL's default."""
    return dataclasses.field(default=TRL_DEFAULTS[name], metadata=PPOParams.__dataclass_fields__[name].metadata)


@dataclass
class PPOConfig(PPOParams):
    learning_rate: float = _trl_default("learning_rate")
    mini_batch_size: int = _trl_default("mini_batch_size")
    init_kl_coef: float = _trl_default("init_kl_coef")
    target: float = _trl_default("target")
    whiten_rewards: bool = _trl_default("whiten_rewards")
    exp_name: str = setting("imdb", "name of the experiment")
    model_name: str = setting("checkpoints/0", "policy: a checkpoint or model directory, or a hub name")
    reward_model_name: str = setting("models/reward", "reward: a text-classification model or module:function")
    query_dataset: str = setting("imdb", "prompts: 'imdb' (the packaged reviews offline) or a hub dataset")
    forward_batch_size: int = setting(16, "rows per no-grad forward pass; float sums depend on it", ">= 1")
    device: str = setting("auto", "where the models run: auto (a GPU if torch sees one, as TRL), cpu, cuda, cuda:N")
    dtype: str = setting("float32", "compute dtype: float32, or bfloat16 autocast (weights and Adam stay float32)",
                         DTYPE_NAMES)

    def ppo_params(self) -> PPOParams:
        """The validated PPO section shared with the DVC stages."""
        from minichatgpt.params import section

        names = {f.name for f in dataclasses.fields(PPOParams)}
        return section({"ppo": {k: v for k, v in dataclasses.asdict(self).items() if k in names}}, "ppo")


config = PPOConfig()

sent_kwargs = {"top_k": None, "function_to_apply": "none", "batch_size": 16}
"""Arguments for the reward model call, as the original notebook's sentiment pipeline."""
