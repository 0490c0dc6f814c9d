"""Reward models: a text-classification model (score = positive-class logit) or user code.

``module:function`` rewards run the user's code: the function takes a list of
texts and returns one float per text. Only use modules you trust.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minichatgpt.models.sources import ModelError, is_function_ref, resolve_ref
from minichatgpt.pipeline.artifacts import verify_checksums

log = logging.getLogger(__name__)

FUNCTION_FILE = "reward_function.json"
"""written by train_reward when the reward is a ``module:function``: a record, never imported from."""
SOURCE_FILE = "source.json"
"""written by train_reward when the reward is a Hugging Face name or a local model directory."""


def load_function(ref: str) -> Callable[[list[str]], Sequence[float]]:
    """Import ``module:function``; modules resolve from the working directory (the project root
    under DVC) first, as with ``python -m``. This runs the user's code."""
    module_name, _, func_name = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"reward.model={ref!r}: cannot import module {module_name!r}: {err}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelError(f"reward.model={ref!r}: {module_name} has no callable {func_name!r}")
    return func


class RewardModel:
    """Scores texts; ``score(texts)`` returns float32 positive-class logits. A model runs on ``device``
    (under the caller's autocast, if any); scores come back to the CPU.

    ``__call__(texts, **sent_kwargs)`` mimics ``pipeline("sentiment-analysis")``
    with ``top_k=None, function_to_apply="none"``: per text a list of
    ``{"label", "score"}`` with index 1 the positive class.
    """

    def __init__(self, ref: str | Path, batch_size: int = 64, device: torch.device | str = "cpu"):
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.function = None
        ref_path = Path(ref)
        if ref_path.is_dir():
            verify_checksums(ref_path)
        if (ref_path / FUNCTION_FILE).is_file():  # a directory is weights and configs, never code
            recorded = json.loads((ref_path / FUNCTION_FILE).read_text()).get("function")
            raise ModelError(f"{ref_path}: holds no weights but records the reward function {recorded!r}; code "
                             "runs only where params.yaml names it (reward.model), never from a model directory")
        if (ref_path / SOURCE_FILE).is_file():  # train_reward recorded a Hub name / local directory
            ref = json.loads((ref_path / SOURCE_FILE).read_text())["model"]
            if is_function_ref(ref):
                raise ModelError(f"{ref_path / SOURCE_FILE}: names {ref!r}, which is not a model")
        if isinstance(ref, str) and is_function_ref(ref):
            self.function = load_function(ref)
            self.model = self.tokenizer = None
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        ref = resolve_ref(ref)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(ref), trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(ref), trust_remote_code=False, dtype=torch.float32
            ).to(self.device).eval()
        except (OSError, ValueError) as err:
            raise ModelError(f"reward model {ref}: cannot be loaded: {err}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.max_length = min(getattr(self.model.config, "max_position_embeddings", 512), 512)

    @torch.no_grad()
    def logits(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            with torch.device("cpu"):  # the tokenizer's tensors: made on the CPU, then moved
                enc = self.tokenizer(
                    texts[start : start + self.batch_size], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
            out.append(self.model(**enc).logits.float().cpu())
        return torch.cat(out).numpy()

    def score(self, texts: list[str]) -> np.ndarray:
        if self.function is not None:
            scores = np.asarray(list(self.function(list(texts))), dtype=np.float32)
            if scores.shape != (len(texts),):
                raise ModelError(f"reward function returned {scores.shape[0]} scores for {len(texts)} texts")
            return scores
        logits = self.logits(list(texts))
        return logits[:, 1 if logits.shape[1] > 1 else 0].astype(np.float32)

    def __call__(self, texts: str | list[str], **kwargs: Any) -> list[list[dict]]:
        if isinstance(texts, str):
            texts = [texts]
        if self.function is not None:
            return [[{"label": "NEGATIVE", "score": -s}, {"label": "POSITIVE", "score": s}] for s in self.score(texts)]
        logits = torch.from_numpy(self.logits(list(texts)))
        if kwargs.get("function_to_apply", "none") == "softmax":
            logits = logits.softmax(-1)
        elif kwargs.get("function_to_apply") == "sigmoid":
            logits = logits.sigmoid()
        labels = self.model.config.id2label
        return [[{"label": labels.get(i, str(i)), "score": float(v)} for i, v in enumerate(row)] for row in logits]
