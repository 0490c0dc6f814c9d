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
class PPOConfig:
    """TRL legacy ``PPOConfig`` fields and defaults, plus the model names."""

    exp_name: str = "imdb"
    model_name: str = "checkpoints/0"
    """policy: a checkpoint/model directory (relative to the project root) or a hub name."""
    reward_model_name: str = "models/reward"
    """reward: a text-classification model directory or hub name, or module:function."""
    query_dataset: str = "imdb"
    learning_rate: float = 1.41e-5
    batch_size: int = 256
    """rollouts per PPO step."""
    forward_batch_size: int = 16
    """rows per no-grad forward pass (memory only; results do not depend on it)."""
    mini_batch_size: int = 16
    """rows per gradient step."""
    gradient_accumulation_steps: int = 1
    """split each minibatch into this many micro-batches; the update is the same."""
    ppo_epochs: int = 4
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True
    target: float = 6.0
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_penalty: str = "kl"
    ratio_threshold: float = 10.0
    max_grad_norm: float = 0.0
    """0 = off (TRL: None)."""
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: float = 0.0
    """0 = off (TRL: None)."""
    missing_eos_penalty: float = 0.0
    """0 = off (TRL: None)."""
    whiten_rewards: bool = False
    early_stopping: bool = False
    target_kl: float = 1.0
    seed: int = 0

    def ppo_params(self) -> PPOParams:
        """The validated PPO section shared with the DVC stages."""
        names = {f.name for f in dataclasses.fields(PPOParams)}
        params = PPOParams(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
        params.validate()
        return params


config = PPOConfig()

sent_kwargs = {"top_k": None, "function_to_apply": "none", "batch_size": 16}
"""Arguments for the reward model call, as the original notebook's sentiment pipeline."""
